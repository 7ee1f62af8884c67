"""Reading training data: local CSV/TSV/JSON/JSONL/Parquet files or one split of a Hub dataset.

Every source becomes a list of plain ``dict`` records (:class:`RawData`); validation for a task lives in
:mod:`bitfit_peft.training.data`. A missing file or an unreadable row is a :class:`DataError` naming the file, the
line and the fix.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.csv"
    >>> _ = path.write_text("text,label\\nhello,ham\\n")
    >>> load_raw(path).records
    [{'text': 'hello', 'label': 'ham'}]
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".pq")


class DataError(ValueError):
    """A problem with the user's data, with a message that names the column and the fix."""


@dataclass
class RawData:
    """Records read from one source, plus label names when the source declares them (Hub ClassLabel)."""

    records: list[dict[str, Any]]
    source: str
    label_names: dict[str, list[str]] = field(default_factory=dict)  # column -> class names


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl_text(text, path)
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            obj = next(iter(lists.values()))  # {"data": [{...}, ...]}
        elif lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            keys = list(lists)
            obj = [dict(zip(keys, row, strict=True)) for row in zip(*lists.values(), strict=True)]  # columnar
        else:
            obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of objects (one per example), or JSON Lines")
    return obj


def _read_jsonl_text(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            msg = f"{path}:{lineno}: invalid JSON ({err.msg}); expected one JSON object per line"
            raise DataError(msg) from err
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
        records.append(rec)
    return records


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Read a local CSV/TSV/JSON/JSONL/Parquet file into a list of row dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            return [dict(row) for row in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".jsonl":
        return _read_jsonl_text(path.read_text(encoding="utf-8-sig"), path)
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError("reading Parquet needs pyarrow: pip install 'bitfit-peft[data]'") from err
        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _hub_label_names(features: Any) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for col, feat in (features or {}).items():
        inner = getattr(feat, "feature", feat)  # Sequence(ClassLabel) -> ClassLabel
        if isinstance(inner, list) and inner:  # datasets>=4 List([ClassLabel])
            inner = inner[0]
        if getattr(inner, "names", None):
            names[col] = list(inner.names)
    return names


def read_hub(
    dataset_id: str, *, split: str = "train", config_name: str | None = None, revision: str | None = None
) -> RawData:
    """Load one split of a Hugging Face Hub dataset with :func:`datasets.load_dataset`."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{dataset_id!r} is not a local file, and loading Hub datasets needs the `datasets` package: "
            "pip install 'bitfit-peft[data]'"
        ) from err
    ds = datasets.load_dataset(dataset_id, name=config_name, split=split, revision=revision)
    return RawData(ds.to_list(), f"{dataset_id}[{split}]", _hub_label_names(ds.features))


def load_raw(
    source: str | Path,
    *,
    split: str = "train",
    config_name: str | None = None,
    revision: str | None = None,
) -> RawData:
    """Read ``source``: an existing local file, else a Hub dataset id (``split`` / ``config_name`` apply)."""
    path = Path(source)
    if path.is_file():
        return RawData(read_local(path), str(path))
    looks_local = path.suffix.lower() in LOCAL_SUFFIXES or str(source).startswith((".", "/", "~"))
    if looks_local or path.is_dir():
        kinds = ", ".join(LOCAL_SUFFIXES)
        raise DataError(f"data file {str(source)!r} does not exist (expected a file: {kinds})")
    return read_hub(str(source), split=split, config_name=config_name, revision=revision)
