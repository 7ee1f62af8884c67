"""Where an adapter folder may lead: nowhere outside itself.

An adapter folder is an untrusted download, so a file in it that is a symlink (or sits behind one) must resolve
inside the folder. The one exception is the Hugging Face cache layout, where ``snapshots/<revision>/<file>`` links
to ``../../blobs/<hash>`` of the same repository. No path is ever read *from* a file.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> os.symlink("/etc/hostname", os.path.join(d, "adapter_config.json"))
    >>> check_confined(d, "adapter_config.json")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    bitfit_peft.errors.BitFitError: ...
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bitfit_peft.errors import BitFitError

#: a Hugging Face Hub repo id: ``name`` (canonical models) or ``owner/name``
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(text: str | os.PathLike | None) -> bool:
    """Whether ``text`` can only mean a Hub repo id (well-formed, and no local file or folder of that name).

    >>> is_hub_id("user/repo"), is_hub_id("./missing"), is_hub_id("a/b/c")
    (True, False, False)
    """
    if not text:
        return False
    text = os.fspath(text)
    return bool(HUB_ID.match(text)) and ".." not in text and not os.path.exists(text)


def looks_local(text: str | os.PathLike) -> bool:
    """Whether ``text`` can only be meant as a local path, never as a Hub id.

    True when it starts with ``.``, ``/``, ``~`` (or ``os.sep``), holds ``os.sep`` twice or more, its first path
    component exists here (``out/missing`` with an ``out`` folder), or it is not a well-formed Hub id.

    >>> looks_local("./missing"), looks_local("~/x"), looks_local("a/b/c"), looks_local("user/repo")
    (True, True, True, False)
    """
    text = os.fspath(text)
    seps = {os.sep, os.altsep} - {None}
    if not text or text[0] in {".", "~", *seps} or sum(text.count(s) for s in seps) >= 2:
        return True
    first = re.split("|".join(re.escape(s) for s in seps), text, maxsplit=1)[0]
    if first != text and os.path.exists(first):
        return True
    return not is_hub_id(text)


def describe_missing(
    path: str | os.PathLike, required: str | None = None, what: str = "a model directory"
) -> str | None:
    """Why ``path`` is not a usable local folder, in one line; None when it is one or it is a Hub id to fetch.

    ``required``: a file the folder must hold (``config.json``, ``adapter_config.json``); ``what``: what such a
    folder is, for the message.

    >>> describe_missing("./missing")
    'no such directory: ./missing'
    >>> import tempfile; d = tempfile.mkdtemp()
    >>> describe_missing(d, "config.json", "a transformers model directory") == (
    ...     f"{d}: no config.json (not a transformers model directory)")
    True
    >>> describe_missing("user/repo") is None
    True
    """
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_dir():
        if required is not None and not (local / required).is_file():
            return f"{text}: no {required} (not {what})"
        return None
    if local.exists():
        return f"{text}: not a directory (expected {what})"
    if looks_local(text):
        return f"no such directory: {text}"
    return None


def local_folder(model_id: Any, subfolder: str | None = None) -> str | None:
    """``model_id`` (+ ``subfolder``) as a local directory, or None for a Hub id."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    return folder if os.path.isdir(folder) else None


def inside(path: str | os.PathLike, roots: Iterable[Path]) -> bool:
    """Whether ``path``, resolved (symlinks followed), is one of ``roots`` or lies below one.

    The one "is this path inside these folders" test of the package. ``roots`` must be resolved already; a path the
    OS cannot resolve raises (``OSError``, ``RuntimeError`` for a symlink loop, ``ValueError`` for a NUL byte).

    >>> import tempfile; root = Path(tempfile.mkdtemp()).resolve()
    >>> inside(root / "a" / ".." / "b", [root]), inside(root, [root]), inside(root / ".." / "etc", [root])
    (True, True, False)
    """
    resolved = Path(path).resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def _allowed_roots(folder: Path) -> list[Path]:
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # huggingface_hub cache: <repo>/snapshots/<rev> -> <repo>/blobs
        roots.append(real.parent.parent / "blobs")
    return roots


def check_confined(folder: str | os.PathLike, name: str) -> None:
    """Refuse ``folder/name`` if it exists and resolves outside ``folder`` (or its Hub-cache blobs)."""
    path = Path(folder) / name
    if not path.exists() and not path.is_symlink():
        return
    if not inside(path, _allowed_roots(Path(folder))):
        raise BitFitError(
            f"{path} resolves to {path.resolve()}, outside the adapter folder; refusing to read it. Copy the real file "
            "into the folder if you trust it."
        )
    if not path.is_file():
        raise BitFitError(f"{path} is not a regular file; an adapter folder holds plain files only.")
