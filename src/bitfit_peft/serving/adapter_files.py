"""Reading an adapter folder for the engine: where it is, what it holds, and nothing outside it.

An adapter folder is untrusted: every file the engine opens must resolve inside the folder (symlinks followed,
the Hugging Face cache's ``snapshots -> blobs`` links allowed) and, when the caller gives ``within`` (a server's
adapter roots), inside one of those folders too. A Hub id is only ever downloaded, never read as a local path when
the caller says it is one (``hub=True``). JSON files are size-bounded; no path is ever taken from a file.

Example:
    >>> import tempfile; root = Path(tempfile.mkdtemp()).resolve()
    >>> locate("../elsewhere", [root])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    bitfit_peft.serving.errors.AdapterPathError: ...
    >>> fetch("user/repo", hub=True, allow_hub=False)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    bitfit_peft.serving.errors.AdapterPathError: ...
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from bitfit_peft.errors import BitFitError
from bitfit_peft.files.paths import HUB_ID, inside, is_hub_id
from bitfit_peft.files.validate import check_adapter_folder, check_plain_file
from bitfit_peft.names import DELTA_KEY, PEFT_PREFIX, SUMMARY_FILE
from bitfit_peft.serving.errors import AdapterNotFoundError, AdapterPathError, BadAdapterPathError, EngineError

__all__ = ["ADAPTER_FILES", "check_files", "fetch", "head_shapes", "locate", "read_json", "read_task_metadata"]

#: every file of an adapter folder the engine (or PEFT, for it) reads
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, SUMMARY_FILE, "config.json")
MAX_JSON_BYTES = 8 << 20  #: a larger config / metadata file is refused, not parsed
_SHOWN = 120  #: characters of a hostile path quoted in a message


def _shown(text: str) -> str:
    return repr(text[:_SHOWN] + ("..." if len(text) > _SHOWN else ""))


def _local_dir(text: str) -> Path | None:
    """``text`` as an existing directory (resolved), None if nothing is there; unusable paths raise."""
    try:
        path = Path(text).expanduser()
        if path.is_dir():
            return path.resolve(strict=True)
        broken = path.is_symlink() and not path.exists()  # dangling or looping link
    except (ValueError, RuntimeError, OSError) as err:  # (our own errors are ValueErrors: none raised in here)
        raise _unusable(text, err) from err
    if broken:
        raise BadAdapterPathError(f"Adapter path {_shown(text)} is a broken or looping symlink.")
    return None


def _unusable(text: str, err: Exception) -> BadAdapterPathError:
    """The error for a path the OS refused to resolve (a NUL byte, a symlink loop, a name too long...)."""
    if isinstance(err, ValueError):  # embedded NUL
        return BadAdapterPathError(f"Adapter path {_shown(text)} is not a valid path ({err}).")
    if isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno == errno.ELOOP):
        return BadAdapterPathError(f"Adapter path {_shown(text)} is a symlink loop; point at a real adapter folder.")
    why = "too long" if getattr(err, "errno", None) == errno.ENAMETOOLONG else (
        getattr(err, "strerror", None) or type(err).__name__)
    return BadAdapterPathError(f"Adapter path {_shown(text)} cannot be used: {why}.")


def _first_inside(raw: Path, roots: Sequence[Path]) -> Path | None:
    """``raw`` (taken relative to each root in turn when relative) resolved inside the first root holding it.

    A path that leaves a root as written (``..``, another absolute path) is refused for it before the filesystem is
    asked anything, so a request cannot learn what exists outside the roots (no existence oracle)."""
    for root in roots:
        candidate = raw if raw.is_absolute() else root / raw
        written = Path(os.path.normpath(candidate))
        if (written == root or written.is_relative_to(root)) and inside(candidate, [root]):
            return candidate.resolve()
    return None


def locate(path: str | os.PathLike, roots: Sequence[Path]) -> Path:
    """The adapter folder ``path`` names inside ``roots`` (resolved folders), symlinks followed.

    A relative ``path`` is taken relative to each root in turn (``~`` is a plain name here). Raises
    :class:`AdapterPathError` (no roots, or outside them), :class:`AdapterNotFoundError` (no folder or no
    ``adapter_config.json`` there) or
    :class:`BadAdapterPathError` (a symlink loop, a file, a path the OS cannot resolve).
    """
    text = os.fspath(path)
    if not roots:
        raise AdapterPathError("Loading adapters from paths is disabled: no adapter roots are configured "
                               "(--adapter-root).")
    try:
        found = _first_inside(Path(text), roots)  # no '~' expansion: '~user' would tell which users exist
        what = "outside" if found is None else _what_is_at(found)
    except (ValueError, RuntimeError, OSError) as err:  # (our own errors are ValueErrors: none raised in here)
        raise _unusable(text, err) from err
    if what == "outside":
        raise AdapterPathError(f"Adapter path {_shown(text)} is outside the allowed adapter folders; give a folder "
                               "inside one of them.")
    if what == "nothing":
        raise AdapterNotFoundError(f"No adapter folder at {_shown(text)} in the adapter roots.")
    if what == "file":
        raise BadAdapterPathError(f"Adapter path {_shown(text)} is a file; give the adapter folder that holds "
                                  f"{CONFIG_NAME}.")
    if what == "folder":
        raise AdapterNotFoundError(f"No adapter ({CONFIG_NAME}) at {_shown(text)} in the adapter roots.")
    assert found is not None
    return found


def _what_is_at(path: Path) -> str:
    """``"nothing"``, ``"file"``, ``"folder"`` (without an adapter config) or ``"adapter"``."""
    if not path.exists():
        return "nothing"
    if not path.is_dir():
        return "file"
    return "adapter" if (path / CONFIG_NAME).is_file() else "folder"


def fetch(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_hub: bool = True,
    hub: bool | None = None,
    within: Sequence[Path] | None = None,
) -> Path:
    """The local folder of an adapter: ``source`` itself, or its Hub snapshot.

    ``hub=True``: ``source`` is a Hub repo id, never read from disk; ``hub=False``: a local folder only; ``None``:
    a local folder if one is there, else a Hub id. ``within`` (resolved folders): a local ``source`` must lie
    inside one of them, and a relative one is taken relative to them (:func:`locate`).
    """
    text = os.fspath(source)
    if hub is not True:
        local = _local_folder(text, within, fall_back_to_hub=hub is None and is_hub_id(text))
        if local is not None:
            return local
        if hub is False:
            raise AdapterNotFoundError(f"Adapter path {_shown(text)}: no such directory.")
        if not is_hub_id(text):
            raise AdapterNotFoundError(f"Adapter {_shown(text)}: no such directory (and not a Hub id like "
                                       "'user/repo').")
    elif not HUB_ID.match(text) or ".." in text:
        raise EngineError(f"{_shown(text)} is not a Hugging Face Hub repo id like 'user/repo'.")
    if not allow_hub:
        raise AdapterPathError(f"Adapter {_shown(text)}: loading from the Hugging Face Hub is disabled.")
    from huggingface_hub import snapshot_download

    try:
        local_dir = snapshot_download(
            text, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
        )
    except Exception as err:  # noqa: BLE001 - network / auth / missing repo: report, keep serving
        raise EngineError(f"Could not download adapter {text!r} from the Hub: {err}") from err
    return Path(local_dir)


def _local_folder(text: str, within: Sequence[Path] | None, fall_back_to_hub: bool) -> Path | None:
    """The adapter folder at ``text`` (inside ``within``, if given); None when nothing is there."""
    if within is not None:
        try:
            return locate(text, within)
        except AdapterNotFoundError:
            if fall_back_to_hub:
                return None
            raise
    local = _local_dir(text)
    if local is not None and not (local / CONFIG_NAME).is_file():
        raise AdapterNotFoundError(
            f"{_shown(text)} has no adapter_config.json; point at a saved BitFit adapter directory."
        )
    return local


def check_files(adapter_dir: Path, within: Sequence[Path] | None = None) -> None:
    """The file-level checks every load path shares (:func:`bitfit_peft.files.validate.check_adapter_folder`), and
    every file the engine may read inside ``within``. A file that links out or is not a plain file raises
    :class:`AdapterPathError`; a hostile or malformed config or header, an ``AdapterFileError``."""
    for name in ADAPTER_FILES:
        try:
            path = check_plain_file(adapter_dir, name)
        except BitFitError as err:
            raise AdapterPathError(str(err)) from err
        if within is not None and path is not None and not inside(path, within):
            raise AdapterPathError(
                f"{name} of adapter {adapter_dir.name!r} resolves outside the allowed adapter folders; copy the "
                "file into the adapter folder instead of linking it."
            )
    check_adapter_folder(adapter_dir)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when absent, not an object, or unreadable. Oversized files raise."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise EngineError(f"{path.name} is larger than {MAX_JSON_BYTES >> 20} MiB; not an adapter file.")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def labels_from_id2label(id2label: Any) -> list[str] | None:
    """``{"0": "neg", "1": "pos"}`` -> ``["neg", "pos"]``; None unless the ids are exactly ``0..n-1``."""
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    if [i for i, _ in items] != list(range(len(items))):
        return None
    return [v for _, v in items]


def read_task_metadata(adapter_dir: Path) -> dict[str, Any]:
    """Label names and kind stored next to an adapter.

    Looked up in order: ``bitfit_training.json`` (written by ``bitfit-peft train``: ``label_names``, ``task``),
    a saved head config ``config.json`` (``id2label``, ``problem_type``), then extra ``label_names`` /
    ``id2label`` keys in ``adapter_config.json``.
    """
    meta: dict[str, Any] = {}
    summary = read_json(adapter_dir / SUMMARY_FILE)
    if isinstance(summary.get("label_names"), list) and summary["label_names"]:
        meta["labels"] = [str(x) for x in summary["label_names"]]
    if summary.get("task") == "regression":
        meta["kind"] = "regression"
    for fname in ("config.json", CONFIG_NAME):
        cfg = read_json(adapter_dir / fname)
        if "labels" not in meta:
            labels = cfg.get("label_names") if isinstance(cfg.get("label_names"), list) else None
            labels = labels or labels_from_id2label(cfg.get("id2label"))
            if labels:
                meta["labels"] = [str(x) for x in labels]
        if "kind" not in meta and cfg.get("problem_type") == "regression":
            meta["kind"] = "regression"
    return meta


def strip_prefix(key: str) -> str:
    """A file key without PEFT's ``base_model.model.`` prefix."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def is_head_key(key: str, heads: Sequence[str]) -> bool:
    """Whether ``key`` names a tensor of one of the ``modules_to_save`` modules ``heads`` (matched like PEFT)."""
    parts = key.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(p == h or p.endswith("." + h) for p in paths for h in heads)


def head_shapes(adapter_dir: Path, heads: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``modules_to_save`` tensors (of the modules ``heads``) in an adapter file, by model path.

    A safetensors file: from its header only. A ``.bin`` file (PEFT's fallback): loaded memory-mapped with
    ``weights_only`` (the pickle is read, the tensor data is not)."""
    file = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    if not file.is_file():
        return _bin_head_shapes(adapter_dir / WEIGHTS_NAME, heads)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                path = _head_path(key, heads)
                if path is not None:
                    shapes[path] = tuple(handle.get_slice(key).get_shape())
    except SafetensorError as err:
        raise EngineError(f"{file} is corrupt or truncated ({err}); re-save or re-download the adapter.") from err
    return shapes


def _bin_head_shapes(file: Path, heads: Sequence[str]) -> dict[str, tuple[int, ...]]:
    if not file.is_file():
        return {}
    import torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable pickle is the same refusal
        raise EngineError(f"{file} cannot be read ({type(err).__name__}); re-save the adapter with safetensors "
                          "(save_pretrained's default).") from err
    if not isinstance(state, dict):
        raise EngineError(f"{file} holds a {type(state).__name__}, not a state dict; re-save the adapter.")
    paths = {k: _head_path(k, heads) for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return {path: tuple(state[k].shape) for k, path in paths.items() if path is not None}


def _head_path(key: str, heads: Sequence[str]) -> str | None:
    """A file key's model path if it names a tensor of one of the heads ``heads`` (not a BitFit delta), else None."""
    if key.endswith(f".{DELTA_KEY}") or f".{DELTA_KEY}." in key:
        return None
    path = strip_prefix(key)
    return path if is_head_key(path, heads) else None
