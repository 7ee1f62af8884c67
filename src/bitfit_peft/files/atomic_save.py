"""All-or-nothing adapter saves that a reader never has to repair.

PEFT writes config, weights, README and one sub-folder per extra adapter as separate files, so a killed save could
leave new weights beside an old config. :func:`transactional_save` builds the complete new folder in a hidden sibling
on the same filesystem, ``<parent>/.<name>.bitfit-save-<pid>-<hex>/<name>`` (same base name, for writers that use it):

1. an existing ``README.md`` is copied in (PEFT updates the card in place), then ``write(stage)`` runs;
2. the old folder's entries the writer did not produce (``optimizer.pt``, ``trainer_state.json``, ``runs/``, other
   adapters' sub-folders) are hard-linked in (copied where links fail), except stale weights beside a new config;
3. all is fsynced and the stage swapped with the folder in one step, Linux ``renameat2(RENAME_EXCHANGE)`` (a plain
   ``rename`` for a new folder); the stage, now holding the old version, is deleted.

The folder's path thus always names a complete directory, old or new: loading needs no recovery step, never writes,
moves or deletes a file and follows no path read from a file. A killed save leaves at most a sibling stage, which the
next save to that folder deletes once its pid is dead. Entries others add to the folder during a save are moved into
the new version (best effort); a reader opening config then weights while a save commits may see two (complete)
versions. Fallback where the exchange is unavailable (not Linux, old kernel, EINVAL) or the folder is the working
directory, a mount point or under a read-only parent: staged files are moved in one by one with ``os.replace``
(weights first, config last), each complete, but this fallback is NOT all-or-nothing across files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from typing import Any

import peft.peft_model
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from bitfit_peft.files.hub import write_model_card
from bitfit_peft.names import is_bitfit

STAGING_PREFIX = ".bitfit-save-"  # a stage is named f".{folder name}{STAGING_PREFIX}{pid}-{hex}"
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
COPIED = ("README.md",)  # updated in place by PEFT: the stage gets a copy of these, never a link
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBUSY, errno.EXDEV}


@functools.cache
def _renameat2_fn() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        if sys.platform.startswith("linux"):
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            return fn
    return None


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the platform, kernel or filesystem does not support it."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:  # -100: AT_FDCWD
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), src, None, dst)


def _fsync(path: str, directory: bool = False) -> None:
    if directory and os.name == "nt":  # directories cannot be opened (nor need a sync) there
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: keep such stages
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def _remove_stale(where: str, name: str) -> None:
    """Delete the stages of ``name`` in ``where`` left by saves whose process has died."""
    pattern = re.compile(re.escape(f".{name}{STAGING_PREFIX}") + r"(\d+)-[0-9a-f]+")
    with contextlib.suppress(OSError):
        for entry in os.listdir(where):
            match = pattern.fullmatch(entry)
            if match and not _alive(int(match.group(1))):
                shutil.rmtree(os.path.join(where, entry), ignore_errors=True)


def _link(src: str, dst: str) -> None:
    """Hard-link ``src`` (a folder: its files, in a copy of the tree) to ``dst``; copy where links fail."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # no hard links on this filesystem (or not allowed)
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(src: str, dst: str, put: Callable[[str, str], None], made: list[str]) -> None:
    """Give ``dst`` the entries of ``src`` it lacks (appended to ``made``), recursing into folders both have; where
    ``dst`` has an adapter file, ``src``'s adapter files are left out (stale weights of another format)."""
    have = set(os.listdir(dst))
    for entry in os.scandir(src):
        path = os.path.join(dst, entry.name)
        if entry.name in have:
            if entry.is_dir(follow_symlinks=False) and os.path.isdir(path) and not os.path.islink(path):
                _carry(entry.path, path, put, made)
        elif STAGING_PREFIX not in entry.name and not (entry.name in ADAPTER_FILES and have & set(ADAPTER_FILES)):
            with contextlib.suppress(FileNotFoundError, FileExistsError):  # raced with another save
                put(entry.path, path)
                made.append(path)


def _carry_from(target: str, stage: str) -> None:
    """Link the old folder's other entries into the stage; again if another save swapped the folder meanwhile."""
    for _ in range(8):
        before, made = os.stat(target).st_ino, []
        try:
            _carry(target, stage, _link, made)
        except OSError:
            if os.stat(target).st_ino == before:
                raise  # a real error (unreadable file...): fail rather than drop the file
        else:
            if os.stat(target).st_ino == before:
                return
        for path in made:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _swap_in(stage: str, target: str) -> bool:
    """Make ``stage`` the folder ``target`` in one step (True), or False where that is not supported."""
    for _ in range(8):
        try:
            os.rename(stage, target)  # new folder (or an empty one)
            return True
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
        _carry_from(target, stage)
        for folder, _, _ in os.walk(stage):
            _fsync(folder, directory=True)
        try:
            if not _renameat2(stage, target, _RENAME_EXCHANGE):
                return False
        except FileNotFoundError:
            continue  # the folder vanished meanwhile: rename again
        with contextlib.suppress(OSError):  # best effort: entries other processes added while we wrote
            _carry(stage, target, lambda src, dst: _renameat2(src, dst, _RENAME_NOREPLACE), [])
        return True
    raise RuntimeError(f"{target}: could not swap in the new version (the folder keeps changing)")


def _replace_files(stage: str, target: str, written: list[str]) -> None:
    """Fallback: ``os.replace`` each written file into place, weights first and configs last (NOT all-or-nothing)."""
    rels = {os.path.relpath(path, stage) for path in written}
    rank = {SAFETENSORS_WEIGHTS_NAME: 0, WEIGHTS_NAME: 0, CONFIG_NAME: 2}
    for rel in sorted(rels, key=lambda r: (rank.get(os.path.basename(r), 1), r)):
        folder, base = os.path.split(rel)
        if base == CONFIG_NAME:  # weights of another format would be read instead of the new ones
            for other in (n for n in ADAPTER_FILES if os.path.join(folder, n) not in rels):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(target, folder, other))
        os.makedirs(os.path.join(target, folder), exist_ok=True)
        os.replace(os.path.join(stage, rel), os.path.join(target, rel))
    for folder in {os.path.dirname(os.path.join(target, rel)) for rel in rels}:
        _fsync(folder, directory=True)


def _holds_cwd(target: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.commonpath([os.path.realpath(os.getcwd()), target]) == target
    return False


def transactional_save(directory: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Run ``write(stage)`` on an empty staging folder, then make it ``directory`` in one step (module docstring).

    Entries of an existing ``directory`` the writer does not produce are kept. The folder keeps its permission bits
    (umask default when new); files the writer creates get the mode a plain ``open()`` would give them.
    """
    target = os.path.realpath(directory)
    if os.path.isfile(target):
        raise ValueError(f"Provided path ({directory}) should be a directory, not a file")
    parent, name = os.path.split(target)
    short = name[:120]  # room for the stage suffix within NAME_MAX
    os.makedirs(parent, exist_ok=True)
    for where in (parent, target):  # (a stage inside the folder is left by a killed fallback save)
        _remove_stale(where, short)
    exists = os.path.isdir(target)
    inside = exists and (os.path.ismount(target) or not os.access(parent, os.W_OK))
    where = target if inside else parent  # staging inside (mount point, read-only parent) means the fallback
    root = os.path.join(where, f".{short}{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    stage = os.path.join(root, name)
    os.mkdir(root, 0o700)
    try:
        os.mkdir(stage)
        file_mode = stat.S_IMODE(os.stat(stage).st_mode) & 0o666  # what open() gives under the current umask
        copied = set()
        if exists:
            old = os.stat(target)
            os.chmod(stage, stat.S_IMODE(old.st_mode))
            with contextlib.suppress(OSError, AttributeError):  # and its owner, where allowed
                os.chown(stage, old.st_uid, old.st_gid)
            for entry in COPIED:
                if os.path.isfile(os.path.join(target, entry)):
                    shutil.copy2(os.path.join(target, entry), os.path.join(stage, entry))
                    copied.add(os.path.join(stage, entry))
        write(stage)
        written = [os.path.join(d, f) for d, _, files in os.walk(stage) for f in files]
        for path in written:
            if os.path.isfile(path) and not os.path.islink(path):
                if path not in copied and not os.stat(path).st_mode & 0o111:
                    os.chmod(path, file_mode)  # tempfile-based writers would leave 0600
                _fsync(path)
        if where == parent and not _holds_cwd(target) and _swap_in(stage, target):
            _fsync(parent, directory=True)
        else:
            _replace_files(stage, target, written)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the old version after a swap, leftovers after the fallback


def _peft_save() -> Callable[..., Any]:
    """PEFT's own ``PeftModel.save_pretrained``, found under wrappers (``__wrapped__`` or a closure cell)."""
    fn: Any = peft.peft_model.PeftModel.save_pretrained
    for _ in range(32):
        if getattr(getattr(fn, "__code__", None), "co_filename", "").endswith(os.path.join("peft", "peft_model.py")):
            return fn
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
            inner = next((c for c in cells if getattr(c, "__name__", "") == "save_pretrained"), None)
        if inner is None:
            break
        fn = inner
    raise RuntimeError("cannot find PEFT's own PeftModel.save_pretrained under its wrappers")


def save_pretrained(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """PEFT's own ``PeftModel.save_pretrained(model, save_directory, **kwargs)``, all-or-nothing (module docstring).

    ``kwargs`` (``selected_adapters``, ``safe_serialization``, ``save_embedding_layers``...) pass through; with
    ``is_main_process=False`` this does exactly what PEFT does. When a saved adapter is BitFit, the BitFit model card
    (:func:`bitfit_peft.files.hub.write_model_card`) is written in the same unit.

    Example:
        >>> import os, tempfile, torch, bitfit_peft
        >>> from peft import PeftModel, get_peft_model
        >>> from bitfit_peft.files.atomic_save import save_pretrained
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_pretrained(get_peft_model(base(), bitfit_peft.BitFitConfig()), folder)
        ...     loaded = PeftModel.from_pretrained(base(), folder)
        ...     sorted(os.listdir(folder))
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    original = _peft_save()
    if not kwargs.get("is_main_process", True) or os.path.isfile(save_directory):
        return original(model, save_directory, **kwargs)
    configs = getattr(model, "peft_config", {})
    card = any(is_bitfit(configs.get(a)) for a in kwargs.get("selected_adapters") or configs)

    def write(stage: str) -> None:
        original(model, stage, **kwargs)
        if card:

            write_model_card(stage, model=model)

    transactional_save(save_directory, write)
