"""Old import paths of 0.1.x that keep working through 0.2.x, with a ``DeprecationWarning``.

0.2.0 moved the flat modules into wings (``tuner/``, ``files/``, ``compat/``). ``import bitfit_peft.hub`` and
``from bitfit_peft.layer import BitFitLayer`` still work for one release: a finder on ``sys.meta_path`` answers
each old name with the module that now holds its code (the same module object, so ``isinstance`` and
monkeypatching behave as before) and warns once per name. The table is fixed here; nothing is read from files.

Example (the first import of an old path warns: ``bitfit_peft.hub moved to bitfit_peft.files.hub ...``):
    >>> import warnings, bitfit_peft
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     from bitfit_peft.hub import push_to_hub
    >>> push_to_hub.__module__
    'bitfit_peft.files.hub'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old module path -> the module that holds its code since 0.2.0 (removed in 0.3.0)
MOVED: dict[str, str] = {
    "bitfit_peft.atomic_save": "bitfit_peft.files.atomic_save",
    "bitfit_peft.base_modules": "bitfit_peft.tuner.base_modules",
    "bitfit_peft.call_plan": "bitfit_peft.tuner.call_plan",
    "bitfit_peft.combine": "bitfit_peft.tuner.combine",
    "bitfit_peft.config": "bitfit_peft.tuner.config",
    "bitfit_peft.delta_format": "bitfit_peft.files.delta_format",
    "bitfit_peft.fingerprint": "bitfit_peft.files.fingerprint",
    "bitfit_peft.groups": "bitfit_peft.tuner.groups",
    "bitfit_peft.heads": "bitfit_peft.tuner.heads",
    "bitfit_peft.hotswap": "bitfit_peft.tuner.hotswap",
    "bitfit_peft.hub": "bitfit_peft.files.hub",
    "bitfit_peft.inspect": "bitfit_peft.bias_report",
    "bitfit_peft.layer": "bitfit_peft.tuner.layer",
    "bitfit_peft.lowmem": "bitfit_peft.tuner.lowmem",
    "bitfit_peft.model": "bitfit_peft.tuner.model",
    "bitfit_peft.offload": "bitfit_peft.compat.offload",
    "bitfit_peft.paths": "bitfit_peft.files.paths",
    "bitfit_peft.routing": "bitfit_peft.tuner.routing",
    "bitfit_peft.targets": "bitfit_peft.tuner.targets",
    "bitfit_peft.transformers_io": "bitfit_peft.compat.transformers_io",
    "bitfit_peft.serving.collator": "bitfit_peft.training.collator",
    "bitfit_peft.cli.inspect": "bitfit_peft.cli.report",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path with its new module (and a ``DeprecationWarning``)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        if fullname not in MOVED:
            return None  # type: ignore[return-value]  # not ours: the next finder looks
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in bitfit-peft 0.2.0; the old path goes in 0.3.0: import {new}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module was executed when it was imported."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
