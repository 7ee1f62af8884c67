"""``import bitfit_peft`` registers BitFit with PEFT without importing torch itself.

When PEFT is already imported, :func:`register` runs at once. Otherwise a finder on ``sys.meta_path`` watches the
import of ``peft`` and of the package's own modules: right after ``peft`` (by whoever imports it: the user,
transformers, a module of this package) has finished importing, and no module of this package is still half-way
through its own import, :mod:`bitfit_peft._api` is imported, which registers the ``BITFIT`` type and installs
:mod:`~bitfit_peft.compat.patches`. So ``import bitfit_peft`` then ``from peft import PeftModel`` works as before,
while ``bitfit-peft --help`` never loads torch.

Example:
    >>> import bitfit_peft, peft
    >>> "BITFIT" in peft.PeftType.__members__
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

_lock = threading.RLock()
_state = {"done": False}


def register() -> ModuleType:
    """Import :mod:`bitfit_peft._api` (registration with PEFT, the public objects); idempotent."""
    with _lock:
        module = importlib.import_module("bitfit_peft._api")
        _state["done"] = True
        _remove_finder()
        return module


def _busy(finished: str) -> bool:
    """Whether a module of this package other than ``finished`` (packages aside) is mid-import."""
    for name, module in list(sys.modules.items()):
        if name == finished or not name.startswith("bitfit_peft.") or hasattr(module, "__path__"):
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def _after(name: str) -> None:
    if _state["done"] or "peft" not in sys.modules or _busy(name):
        return
    if name != "peft" and getattr(getattr(sys.modules.get("peft"), "__spec__", None), "_initializing", False):
        return
    register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``peft`` and ``bitfit_peft.*`` as the path finder does; their loaders call :func:`_after` when done."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "peft" and not fullname.startswith("bitfit_peft."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _after(fullname)

        spec.loader.exec_module = exec_module  # this spec's loader only
        return spec


_FINDER = _Finder()


def _remove_finder() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if PEFT is loaded, else when it is (called by ``bitfit_peft/__init__``)."""
    if "peft" in sys.modules and not getattr(sys.modules["peft"].__spec__, "_initializing", False):
        register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
