"""The one file-level check of an adapter folder, shared by every load path.

``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers' ``load_adapter``, :func:`hotswap_adapter`
and the serving engine all call :func:`check_adapter_folder` before they read anything else from a folder (and
:func:`check_keys` runs again on the tensors of every file, so a Hub download gets the key grammar too). Each
check is bounded in time and memory *before* an object is built from the file, and each refusal is an
:class:`AdapterFileError` (a :class:`~bitfit_peft.errors.BitFitError`) naming the file and the problem:

* **confinement**: ``adapter_config.json`` and the weights files are plain files, no symlinks (except the Hugging
  Face cache's ``snapshots/<rev>/<file> -> ../../blobs/<hash>``), nothing that could block (a FIFO, a device):
  ``os.lstat``/``os.stat`` decide before anything is opened;
* **config bounds**: at most :data:`MAX_CONFIG_BYTES`, valid UTF-8 JSON, nesting at most :data:`MAX_DEPTH` deep,
  lists of at most :data:`MAX_LIST_ITEMS` items and strings of at most :data:`MAX_STRING_CHARS` characters;
* **header bounds**: the safetensors header is at most :data:`MAX_HEADER_BYTES` and declares at most
  :data:`MAX_TENSORS` tensors (counted in the raw bytes before the header is parsed), each of a known dtype, a
  shape of at most :data:`MAX_DIMS` non-negative dimensions whose size matches its data offsets, inside the file;
* **key grammar** (:func:`check_keys`): a delta is ``<module>.bitfit_delta`` (bitfit-peft 0.1.0:
  ``<module>.bitfit_delta.delta``, stacked ``<...>.*.<...>.bitfit_delta.delta`` with an integer
  ``....bitfit_delta.layer_index``); nothing else may name ``bitfit_delta`` (``....bitfit_delta.default`` would
  override the loaded adapter's entry), no key names ``modules_to_save`` / ``original_module``, and no two entries
  may describe the same delta (a flat 0.1.0 entry beside a new-layout one). Stacked entries that collide with a
  plain one are refused when they are expanded (:func:`bitfit_peft.files.delta_format.from_legacy`).

The model-level checks (every expected delta present, right shapes, float, finite) follow in
:func:`bitfit_peft.files.delta_format.check_adapter_state_dict` once the model is known.

Example:
    >>> check_keys(["base_model.model.fc.bitfit_delta", "base_model.model.fc.bitfit_delta.default"], "f")
    ... # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    bitfit_peft.files.validate.AdapterFileError: ...
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from bitfit_peft.errors import BitFitError
from bitfit_peft.files.paths import allowed_roots
from bitfit_peft.names import DELTA_KEY

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 4 << 20  #: an adapter_config.json is a few kB; this leaves room for long target lists
MAX_DEPTH = 32  #: nesting of a config (a BitFit config nests 3 deep)
MAX_LIST_ITEMS = 65_536  #: items of one list in a config (layers_to_transform, target_modules...)
MAX_STRING_CHARS = 65_536  #: characters of one string in a config (a target regex...)
MAX_HEADER_BYTES = 16 << 20  #: a safetensors header (a 70B model's BitFit file: under 200 kB)
MAX_TENSORS = 65_536  #: tensors in one adapter file (one per adapted module and head tensor)
MAX_DIMS = 8
MAX_KEY_CHARS = 1024
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
INT_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
DTYPE_BYTES = {**FLOAT_DTYPES, **INT_DTYPES, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
LEGACY_DELTA = f".{DELTA_KEY}.delta"
LEGACY_INDEX = f".{DELTA_KEY}.layer_index"
_PART = re.compile(r"^[A-Za-z0-9_-]+$")
_FORBIDDEN_PARTS = ("modules_to_save", "original_module")
_SHOWN = 3


class AdapterFileError(BitFitError):
    """An adapter file is unsafe or malformed; the message names the file and the problem."""


def _refuse(path: str | os.PathLike, problem: str, fix: str = "Re-save or re-download the adapter.") -> NoReturn:
    raise AdapterFileError(f"{os.fspath(path)}: {problem}; refusing to load it. {fix}")


# ---------------------------------------------------------------------------------------------- confinement
def check_plain_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``folder/name`` if it is a plain file of the folder; None if absent. A symlink (but a Hub-cache blob link),
    a FIFO, a device or a folder is refused; nothing is opened."""
    path = Path(folder) / name
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        _refuse(path, f"cannot be inspected ({err})", "Give a readable adapter folder.")
    if stat.S_ISLNK(link.st_mode):
        try:
            target = path.resolve(strict=True)
            info = os.stat(path)
        except (OSError, RuntimeError) as err:
            _refuse(path, f"is a broken or looping symlink ({err})", "Copy the real file into the folder.")
        if not any(target.is_relative_to(root) for root in allowed_roots(Path(folder))[1:]):
            _refuse(path, f"is a symlink (to {target}); adapter files must be plain files of the folder",
                    "Copy the real file into the folder if you trust it.")
    else:
        info = link
    if not stat.S_ISREG(info.st_mode):
        _refuse(path, "is not a regular file (a FIFO, device or folder)", "An adapter folder holds plain files only.")
    return path


# ---------------------------------------------------------------------------------------------- config
def read_config(path: str | os.PathLike, *, lenient: bool = False) -> dict[str, Any] | None:
    """The JSON object in a config file, refused unless size, encoding, nesting and list/string sizes are bounded.

    ``lenient``: a file that is merely not a JSON object (a syntax error, a list) gives None, for PEFT to report as
    it does for any tuner; hostile sizes and nesting are refused all the same."""
    folder, name = os.path.split(os.fspath(path))
    file = check_plain_file(folder or ".", name)
    if file is None:
        _refuse(path, "does not exist", "Point at a saved adapter folder.")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        _refuse(path, f"is {size:,} bytes, over the {MAX_CONFIG_BYTES:,} an adapter config may have")
    try:
        with open(file, "rb") as handle:
            data = json.loads(handle.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except RecursionError:
        _refuse(path, f"is nested deeper than {MAX_DEPTH} levels")
    except (UnicodeDecodeError, ValueError) as err:
        if lenient:
            return None
        _refuse(path, f"is not valid UTF-8 JSON ({str(err)[:120]})")
    except OSError as err:
        _refuse(path, f"cannot be read ({err})")
    check_json_bounds(data, path)
    if not isinstance(data, dict):
        if lenient:
            return None
        _refuse(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def check_json_bounds(data: Any, where: str | os.PathLike) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH`, longer lists or strings (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                _refuse(where, f"holds a string of {len(value):,} characters (at most {MAX_STRING_CHARS:,})")
            continue
        if not isinstance(value, (list, dict)):
            continue
        if depth > MAX_DEPTH:
            _refuse(where, f"is nested deeper than {MAX_DEPTH} levels")
        if len(value) > MAX_LIST_ITEMS:
            _refuse(where, f"holds a list or object of {len(value):,} items (at most {MAX_LIST_ITEMS:,})")
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
        stack.extend((v, depth + 1) for v in items)


# ---------------------------------------------------------------------------------------------- weights
def read_header(path: str | os.PathLike, max_tensors: int = MAX_TENSORS) -> dict[str, dict[str, Any]]:
    """The checked safetensors header of ``path``: ``{key: {"dtype", "shape", "data_offsets"}}``."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                _refuse(path, "is corrupt or truncated (too short to be a safetensors file)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                _refuse(path, f"is corrupt or truncated, or hostile: it declares a {length:,}-byte header (file: "
                              f"{size:,} bytes, limit {MAX_HEADER_BYTES:,})")
            raw = handle.read(length)
    except OSError as err:
        _refuse(path, f"cannot be read ({err})")
    declared = raw.count(b'"data_offsets"')
    if declared > max_tensors:
        _refuse(path, f"declares {declared:,} tensors (at most {max_tensors:,} fit this model)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        _refuse(path, "has a header nested too deep")
    except (UnicodeDecodeError, ValueError) as err:
        _refuse(path, f"is corrupt or truncated (its header is not valid JSON: {str(err)[:120]})")
    if not isinstance(header, dict):
        _refuse(path, "has a header that is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        _refuse(path, "has __metadata__ that is not a string-to-string map")
    if len(header) > max_tensors:
        _refuse(path, f"declares {len(header):,} tensors (at most {max_tensors:,} fit this model)")
    data_size = size - 8 - length
    for key, entry in header.items():
        _check_entry(path, key, entry, data_size)
    check_keys(header, path, dtypes={k: e["dtype"] for k, e in header.items()})
    _check_stacks(path, header, 8 + length)
    return header


def _check_entry(path: str | os.PathLike, key: str, entry: Any, data_size: int) -> None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        _refuse(path, f"has a malformed header entry for {key[:80]!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        _refuse(path, f"stores {key[:80]!r} as {str(dtype)[:20]!r}, not a known dtype")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
        _refuse(path, f"declares a malformed shape for {key[:80]!r} (at most {MAX_DIMS} non-negative dimensions)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        _refuse(path, f"is corrupt or truncated (data offsets of {key[:80]!r} lie outside the file)")
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        _refuse(path, f"declares {key[:80]!r} with a shape that does not match its data size")


def _check_stacks(path: str | os.PathLike, header: dict[str, dict[str, Any]], data_start: int) -> None:
    """Every 0.1.0 stacked delta has a 1-D integer index of its first dimension's length, and vice versa; its rows
    land on distinct layers that no other entry of the file names."""
    taken = {k.removesuffix(LEGACY_DELTA) if k.endswith(LEGACY_DELTA) else k.removesuffix(f".{DELTA_KEY}")
             for k in header if k.endswith((LEGACY_DELTA, f".{DELTA_KEY}"))}
    for key, entry in header.items():
        if ".*." not in key or not key.endswith(LEGACY_DELTA):
            continue
        index = header.get(key.removesuffix(LEGACY_DELTA) + LEGACY_INDEX)
        if index is None or len(index["shape"]) != 1 or not entry["shape"] or entry["shape"][0] != index["shape"][0]:
            _refuse(path, f"has a stacked delta {key[:80]!r} without a matching layer index")
        begin, end = index["data_offsets"]
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            raw = handle.read(end - begin)
        width = INT_DTYPES[index["dtype"]]
        signed = index["dtype"].startswith("I")
        rows = [int.from_bytes(raw[i:i + width], "little", signed=signed) for i in range(0, len(raw), width)]
        for row in rows:
            layer = key.removesuffix(LEGACY_DELTA).replace(".*.", f".{row}.", 1)
            if row < 0 or layer in taken:
                _refuse(path, f"has a stacked delta {key[:80]!r} whose layer {row} is negative or already has an "
                              "entry (ambiguous)", "Keep one entry per layer and re-save the adapter.")
            taken.add(layer)


def check_keys(
    keys: Iterable[str], where: str | os.PathLike, dtypes: dict[str, str] | None = None
) -> None:
    """Refuse keys outside the adapter file grammar (see the module docstring), or two naming the same delta.

    ``dtypes`` (safetensors dtype names, from a header): deltas must be float, layer indices integer."""
    deltas: set[str] = set()
    stacked_indices: set[str] = set()
    keys = list(keys)
    for key in keys:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            _refuse(where, f"has a tensor key that is empty, not text or over {MAX_KEY_CHARS} characters")
        parts = key.split(".")
        stacked = "*" in parts
        if not all(_PART.match(p) or (p == "*" and stacked) for p in parts) or parts.count("*") > 1:
            _refuse(where, f"has a malformed tensor key {key[:80]!r} (empty or odd path parts)")
        if any(p in _FORBIDDEN_PARTS for p in parts):
            _refuse(where, f"has a tensor key {key[:80]!r} naming PEFT's internal copies (modules_to_save)")
        kind = _key_kind(key, parts)
        if kind is None:
            _refuse(where, f"has a tensor key {key[:80]!r} that is not a BitFit delta "
                           f"('<module>.{DELTA_KEY}') but names one")
        if stacked and kind not in ("legacy", "index"):
            _refuse(where, f"has a '*' in a tensor key {key[:80]!r} that is not a 0.1.0 stacked delta")
        dtype = (dtypes or {}).get(key)
        if kind in ("delta", "legacy") and dtype is not None and dtype not in FLOAT_DTYPES:
            _refuse(where, f"stores the delta {key[:80]!r} as {dtype}, not a float type")
        if kind == "index":
            if dtype is not None and dtype not in INT_DTYPES:
                _refuse(where, f"stores the layer index {key[:80]!r} as {dtype}, not an integer type")
            stacked_indices.add(key.removesuffix(LEGACY_INDEX))
        if kind in ("delta", "legacy"):
            module = key.removesuffix(LEGACY_DELTA) if kind == "legacy" else key.removesuffix(f".{DELTA_KEY}")
            if module in deltas:
                _refuse(where, f"holds two entries for the delta of {module[:80]!r} (new-layout and 0.1.0)",
                        "Keep one of them and re-save the adapter.")
            deltas.add(module)
    orphans = stacked_indices - {k.removesuffix(LEGACY_DELTA) for k in keys if k.endswith(LEGACY_DELTA)}
    if orphans:
        _refuse(where, f"has a layer index without its stacked delta ({sorted(orphans)[:_SHOWN]})")


def _key_kind(key: str, parts: list[str]) -> str | None:
    """``delta``, ``legacy`` (0.1.0 delta), ``index`` (0.1.0 layer index), ``tensor`` (a head's); None: malformed."""
    if DELTA_KEY not in parts:
        return "tensor"
    if parts.count(DELTA_KEY) > 1:
        return None
    if parts[-1] == DELTA_KEY:
        return "delta"
    if parts[-2:] == [DELTA_KEY, "delta"]:
        return "legacy"
    if parts[-2:] == [DELTA_KEY, "layer_index"] and "*" in parts:
        return "index"
    return None


# ---------------------------------------------------------------------------------------------- the folder
def check_adapter_folder(folder: str | os.PathLike, *, max_tensors: int = MAX_TENSORS) -> dict[str, Any]:
    """Every file-level check of an adapter folder (module docstring); returns the parsed ``adapter_config.json``.

    ``max_tensors``: a tighter bound on the weights file's tensor count when the caller knows the model."""
    folder = Path(folder)
    config_path = check_plain_file(folder, CONFIG_FILE)
    if config_path is None:
        _refuse(folder / CONFIG_FILE, "does not exist", "Point at a saved adapter folder.")
    config = read_config(config_path)
    assert config is not None
    weights = [check_plain_file(folder, name) for name in WEIGHTS_FILES]
    if weights[0] is not None:
        read_header(weights[0], max_tensors)
    return config


def local_adapter_folder(model_id: Any, subfolder: str | None = None) -> Path | None:
    """``model_id`` (+ ``subfolder``) as a local adapter folder, None for a Hub id (checked where it is read)."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    try:
        folder = Path(os.fspath(model_id)).expanduser() / (subfolder or "")
        return folder if folder.is_dir() else None
    except (OSError, ValueError):
        return None
