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
from pathlib import Path
from typing import Any

from .errors import BitFitError

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


def local_folder(model_id: Any, subfolder: str | None = None) -> str | None:
    """``model_id`` (+ ``subfolder``) as a local directory, or None for a Hub id."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    return folder if os.path.isdir(folder) else None


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
    target = path.resolve()
    if not any(target == root or root in target.parents for root in _allowed_roots(Path(folder))):
        raise BitFitError(
            f"{path} resolves to {target}, outside the adapter folder; refusing to read it. Copy the real file into "
            "the folder if you trust it."
        )
    if not target.is_file():
        raise BitFitError(f"{path} is not a regular file; an adapter folder holds plain files only.")
