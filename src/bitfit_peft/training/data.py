"""Dataset loading for BitFit training: local CSV/TSV/JSON/JSONL/Parquet files or Hub datasets.

Rows are read into plain ``dict`` records (:mod:`bitfit_peft.training.sources`), validated for the chosen task
(clear errors naming the column and the fix), split into a fixed, seeded train/dev partition and tokenised into
small in-memory datasets.

Tasks: ``seq-cls`` (single sentences or pairs), ``regression`` (a float target, pairs allowed),
``token-cls`` (per-word tags) and ``causal-lm`` (plain text, or chat ``messages``: :mod:`.chat_data`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bitfit_peft.training.chat_data import CHAT_COLUMN, chat_examples, encode_chat, is_chat
from bitfit_peft.training.sources import DataError, RawData, load_raw
from bitfit_peft.training.task_names import SEQUENCE_TASKS, TASKS, normalize_task  # noqa: F401 - this API too

IGNORE_INDEX = -100


def demo_data_path() -> Path:
    """Path of the packaged SMS Spam demo CSV (``text,label`` with labels ham/spam)."""
    return Path(str(resources.files("bitfit_peft").joinpath("data", "sms_spam_demo.csv")))


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Validated examples for one task: ``{"text", "text_pair"?, "label"?}`` dicts, split into train/dev."""

    task: str
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    label_names: list[str] | None
    source: str
    text_column: str
    text_pair_column: str | None = None
    label_column: str | None = None

    @property
    def num_labels(self) -> int:
        """Classes for seq-cls/token-cls, 1 for regression, 0 for causal-lm."""
        if self.task == "regression":
            return 1
        return len(self.label_names or [])

    def majority_accuracy(self) -> float | None:
        """Dev accuracy of always predicting the most frequent training class (seq-cls only)."""
        if self.task != "seq-cls" or not self.dev:
            return None
        top = Counter(ex["label"] for ex in self.train).most_common(1)[0][0]
        return sum(ex["label"] == top for ex in self.dev) / len(self.dev)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _check_columns(records: list[dict[str, Any]], required: dict[str, str], source: str) -> None:
    if not records:
        raise DataError(f"{source}: no rows found")
    columns = list(records[0].keys())
    for flag, col in required.items():
        if col not in records[0]:
            raise DataError(
                f"{source}: column {col!r} not found (available columns: {', '.join(map(repr, columns))}). "
                f"Pass the right name with {flag}."
            )


def _text(value: Any, col: str, row: int, flag: str) -> str:
    if _is_missing(value):
        raise DataError(f"column {col!r}: row {row} is empty; drop or fill such rows (or check {flag})")
    if isinstance(value, (list, dict)):
        raise DataError(
            f"column {col!r} must hold text, but row {row} holds a {type(value).__name__}; "
            f"pass a text column with {flag}, or use --task token-cls for pre-split words"
        )
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"column {col!r}: row {row} holds invalid Unicode (a lone surrogate such as \\ud800 at "
                        f"character {err.start}); fix or drop that row") from err
    return text


def _words(value: Any, col: str, row: int) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(
        f"column {col!r} must hold a list of words (or a whitespace-separated string) for token-cls; "
        f"row {row} holds {value!r:.60}. Pick the word column with --text-column"
    )


def _class_labels(values: list[Any], col: str, declared: list[str] | None) -> tuple[list[int], list[str]]:
    """Map raw class labels (str / int / bool / integral float) to ids; return (ids, names)."""
    for row, v in enumerate(values):
        if _is_missing(v):
            raise DataError(f"column {col!r}: row {row} has no label; drop or fill rows without a label")
        if isinstance(v, (list, dict)):
            raise DataError(
                f"column {col!r} holds {type(v).__name__}s (row {row}), not one class per example; "
                "for per-token tags use --task token-cls, otherwise pick another --label-column"
            )
        if isinstance(v, float) and not v.is_integer():
            raise DataError(
                f"column {col!r} holds continuous values (e.g. {v} in row {row}); use --task regression "
                "for a numeric target, or map the values to classes"
            )
    if declared is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = [v for v in values if not 0 <= v < len(declared)]
        if bad:
            raise DataError(f"column {col!r}: label {bad[0]} is outside the declared classes {declared}")
        return list(values), list(declared)
    keys = [str(int(v)) if isinstance(v, float) else str(v).strip() for v in values]
    distinct = sorted(set(keys), key=lambda k: (0, int(k), "") if _is_int(k) else (1, 0, k))
    if len(distinct) < 2:
        raise DataError(
            f"column {col!r} has a single class ({distinct[0]!r}); classification needs at least two. "
            "Check --label-column (or use --task regression / causal-lm)"
        )
    if len(distinct) > max(100, len(values) // 2):
        raise DataError(
            f"column {col!r} has {len(distinct)} distinct values in {len(values)} rows: it looks like free "
            "text or a numeric target, not a class label. Check --label-column / --text-column, or use "
            "--task regression"
        )
    index = {k: i for i, k in enumerate(distinct)}
    return [index[k] for k in keys], distinct


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _float_label(value: Any, col: str, row: int) -> float:
    if isinstance(value, bool) or _is_missing(value):
        raise DataError(f"column {col!r}: row {row} has no numeric target; drop or fill such rows")
    try:
        target = float(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(
            f"column {col!r} must be numeric for --task regression, but row {row} holds {value!r:.40}; "
            "use --task seq-cls for categorical labels"
        ) from err
    if not math.isfinite(target):
        raise DataError(f"column {col!r}: row {row} holds {value!r:.40}, not a finite number; a regression target "
                        "must be finite (NaN, Inf and values beyond 1.8e308 are not). Fix or drop that row")
    return target


def build_examples(
    raw: RawData,
    task: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    label_names: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Validate ``raw`` for ``task`` and convert it to examples; returns (examples, label names).

    ``label_names`` fixes the class order (used for a separate dev file so ids match the training set). Every
    problem is a :class:`DataError` naming the source.
    """
    try:
        return _build_examples(raw, task, text_column, text_pair_column, label_column, label_names)
    except DataError as err:
        if str(err).startswith(raw.source):
            raise
        raise DataError(f"{raw.source}: {err}") from err


def _build_examples(
    raw: RawData,
    task: str,
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,
    label_names: list[str] | None,
) -> tuple[list[dict[str, Any]], list[str] | None]:
    task = normalize_task(task)
    records = raw.records
    chat = task == "causal-lm" and is_chat(records, text_column)
    required = {"--text-column": CHAT_COLUMN if chat else text_column}
    if text_pair_column:
        if task not in SEQUENCE_TASKS:
            raise DataError("--text-pair-column is only supported for --task seq-cls / regression")
        required["--text-pair-column"] = text_pair_column
    if task != "causal-lm":
        if not label_column:
            raise DataError(f"--task {task} needs a --label-column")
        required["--label-column"] = label_column
    _check_columns(records, required, raw.source)
    if chat:
        return chat_examples(records), None

    if task == "token-cls":
        declared = label_names or raw.label_names.get(label_column or "")
        return _token_examples(records, text_column, label_column or "", declared)
    examples: list[dict[str, Any]] = []
    for row, rec in enumerate(records):
        ex = {"text": _text(rec[text_column], text_column, row, "--text-column")}
        if text_pair_column:
            ex["text_pair"] = _text(rec[text_pair_column], text_pair_column, row, "--text-pair-column")
        examples.append(ex)
    if task == "causal-lm":
        return examples, None
    values = [rec[label_column] for rec in records]
    if task == "regression":
        for row, (ex, v) in enumerate(zip(examples, values, strict=True)):
            ex["label"] = _float_label(v, label_column or "", row)
        return examples, None
    declared = label_names or raw.label_names.get(label_column or "")
    ids, names = _class_labels(values, label_column or "", declared)
    for ex, i in zip(examples, ids, strict=True):
        ex["label"] = i
    return examples, names


def _token_examples(
    records: Sequence[dict[str, Any]], text_column: str, label_column: str, declared: list[str] | None
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """token-cls examples (``{"words", "labels"}``, one tag id per word) and the tag names."""
    examples: list[dict[str, Any]] = []
    tag_rows = []
    for row, rec in enumerate(records):
        words = _words(rec[text_column], text_column, row)
        tags = rec[label_column]
        tags = tags.split() if isinstance(tags, str) else tags
        if not isinstance(tags, (list, tuple)):
            raise DataError(
                f"column {label_column!r} must hold one tag per word (a list or a whitespace-separated "
                f"string) for token-cls; row {row} holds {tags!r:.40}"
            )
        if len(tags) != len(words):
            raise DataError(
                f"row {row}: {len(words)} words in {text_column!r} but {len(tags)} tags in "
                f"{label_column!r}; every word needs exactly one tag"
            )
        examples.append({"words": words})
        tag_rows.append(list(tags))
    flat = [t for tags in tag_rows for t in tags]
    ids, names = _class_labels(flat, label_column, declared)
    pos = 0
    for ex, tags in zip(examples, tag_rows, strict=True):
        ex["labels"] = ids[pos : pos + len(tags)]
        pos += len(tags)
    return examples, names


def split_train_dev(
    examples: Sequence[dict[str, Any]], dev_fraction: float, seed: int, stratify: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fixed, seeded train/dev split (stratified by ``label`` when ``stratify``); both parts are shuffled."""
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"dev fraction must be in (0, 1), got {dev_fraction}")
    rng = random.Random(seed)
    if stratify:
        buckets: dict[Any, list[int]] = {}
        for i, ex in enumerate(examples):
            buckets.setdefault(ex["label"], []).append(i)
        groups = [buckets[k] for k in sorted(buckets)]
    else:
        groups = [list(range(len(examples)))]
    train_idx: list[int] = []
    dev_idx: list[int] = []
    for idx in groups:
        rng.shuffle(idx)
        n_dev = max(1, round(len(idx) * dev_fraction)) if len(idx) > 1 else 0
        dev_idx += idx[:n_dev]
        train_idx += idx[n_dev:]
    rng.shuffle(train_idx)
    rng.shuffle(dev_idx)
    if not train_idx or not dev_idx:
        raise DataError(f"too few rows ({len(examples)}) to split into train and dev; add rows or a dev set")
    return [examples[i] for i in train_idx], [examples[i] for i in dev_idx]


def load_task_data(
    source: str | Path | None = None,
    *,
    task: str = "seq-cls",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    dev_source: str | Path | None = None,
    split: str = "train",
    dev_split: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    dev_fraction: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> TaskData:
    """Load, validate and split a dataset (``source=None``: the packaged SMS Spam demo).

    The dev set is ``dev_source`` (a file or Hub id), else ``dev_split`` of the same Hub dataset, else a
    seeded ``dev_fraction`` hold-out of the training rows. Both sides are shuffled with ``seed``, and
    ``max_*_samples`` cap each side after that.
    """
    task = normalize_task(task)
    raw = load_raw(source if source is not None else demo_data_path(), split=split, config_name=config_name,
                   revision=revision)  # fmt: skip
    cols = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    examples, names = build_examples(raw, task, **cols)
    if dev_source is not None or dev_split is not None:
        dev_raw = load_raw(
            dev_source if dev_source is not None else (source if source is not None else demo_data_path()),
            split=dev_split or split,
            config_name=config_name,
            revision=revision,
        )
        dev, dev_names = build_examples(dev_raw, task, label_names=names, **cols)
        if names is not None and dev_names != names:
            raise DataError(
                f"dev set labels {dev_names} differ from the training labels {names} in column {label_column!r}"
            )
        train, dev = list(examples), list(dev)
        random.Random(seed).shuffle(train)
        random.Random(seed + 1).shuffle(dev)  # a cap (or a probe reading the first rows) must not see one class only
    else:
        train, dev = split_train_dev(examples, dev_fraction, seed, stratify=task == "seq-cls")
    if max_train_samples is not None:
        train = train[:max_train_samples]
    if max_eval_samples is not None:
        dev = dev[:max_eval_samples]
    return TaskData(task, train, dev, names, raw.source, text_column, text_pair_column, label_column)


# ----------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------


class EncodedDataset(torch.utils.data.Dataset):
    """A list of tokenised features (dicts of int lists), usable by :class:`transformers.Trainer`."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def encode(examples: Sequence[dict[str, Any]], tokenizer: Any, task: str, max_length: int) -> EncodedDataset:
    """Tokenise examples for ``task`` (token-cls: each word's label goes to its first sub-token)."""
    task = normalize_task(task)
    if not examples:
        return EncodedDataset([])
    if task == "token-cls":
        enc = tokenizer([ex["words"] for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)  # fmt: skip
        features = []
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            labels, previous = [], None
            for wid in word_ids:
                labels.append(ex["labels"][wid] if wid is not None and wid != previous else IGNORE_INDEX)
                previous = wid
            features.append({k: enc[k][i] for k in enc.keys()} | {"labels": labels})
        return EncodedDataset(features)
    if "messages" in examples[0]:  # causal-lm chat data
        return EncodedDataset(encode_chat(examples, tokenizer, max_length))
    texts = [ex["text"] for ex in examples]
    pairs = [ex["text_pair"] for ex in examples] if "text_pair" in examples[0] else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(examples))]
    if task != "causal-lm":
        for feat, ex in zip(features, examples, strict=True):
            feat["labels"] = ex["label"]
    return EncodedDataset(features)
