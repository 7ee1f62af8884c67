"""Where an adapter folder may lead: nowhere outside itself.

Path tests shared by the CLI, the loaders and the engine: Hub id or local folder, and whether a path lies inside
given folders. The checks of the files *in* an adapter folder are :mod:`bitfit_peft.files.validate`. No path is ever
read *from* a file.

Example:
    >>> is_hub_id("user/repo"), looks_local("./adapter")
    (True, True)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def allowed_roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may resolve: the folder itself and, for a Hugging Face cache snapshot
    (``<repo>/snapshots/<rev>``), the repository's ``blobs`` folder its files link to."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # huggingface_hub cache: <repo>/snapshots/<rev> -> <repo>/blobs
        roots.append(real.parent.parent / "blobs")
    return roots
