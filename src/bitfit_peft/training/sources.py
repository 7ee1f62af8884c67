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
import io
import json
import sys
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


def _text_of(path: Path) -> str:
    """The file's text: UTF-8 (a BOM allowed) or a one-line error saying how to convert it."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: UTF-16 text, not UTF-8. Save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}; Latin-1 or binary?). Save it as "
            "UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
        ) from err


def _parse_json(text: str, path: Path, where: str = "") -> Any:
    """``json.loads`` whose hostile-input failures are one-line :class:`DataError`\\ s (JSON syntax errors raise as
    ``json.JSONDecodeError``, for the caller to report)."""
    try:
        return json.loads(text)
    except RecursionError as err:
        raise DataError(f"{path}{where}: JSON nested too deep to be training data. Flatten it to one object per "
                        "example") from err
    except json.JSONDecodeError:
        raise
    except ValueError as err:  # int() of a number of more than sys.get_int_max_str_digits() digits
        raise DataError(f"{path}{where}: a JSON number of more than {sys.get_int_max_str_digits():,} digits. Store "
                        "such values as strings, or fix the row") from err


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = _text_of(path)
    try:
        obj = _parse_json(text, path)
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
            rec = _parse_json(line, path, f":{lineno}")
        except json.JSONDecodeError as err:
            msg = f"{path}:{lineno}: invalid JSON ({err.msg}); expected one JSON object per line"
            raise DataError(msg) from err
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
        records.append(rec)
    return records


def _read_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(_text_of(path), newline=""), delimiter=delimiter)
    try:
        return [dict(row) for row in reader]
    except csv.Error as err:
        raise DataError(
            f"{path}: line {reader.line_num}: {err} (a field over {csv.field_size_limit():,} characters, or a broken "
            "quote?). Shorten or fix that row"
        ) from err


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Read a local CSV/TSV/JSON/JSONL/Parquet file into a list of row dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".jsonl":
        return _read_jsonl_text(_text_of(path), path)
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
