"""The package's public objects and the registration with PEFT (imports torch and peft).

``bitfit_peft/__init__.py`` stays light (the CLI starts without torch); this module runs once PEFT is imported (by
anyone) or a public object of ``bitfit_peft`` is used, see :mod:`bitfit_peft._lazy`.
"""

from __future__ import annotations

from bitfit_peft.compat import moved_modules as _moved_modules
from bitfit_peft.compat import patches as _compat
from bitfit_peft.compat import registration as _registration
from bitfit_peft.errors import BitFitError
from bitfit_peft.files.atomic_save import save_pretrained
from bitfit_peft.names import __version__
from bitfit_peft.tuner.config import BitFitConfig, allow_base_mismatch
from bitfit_peft.tuner.hotswap import hotswap_adapter
from bitfit_peft.tuner.layer import BiasDeltas, BitFitLayer
from bitfit_peft.tuner.lowmem import cast_frozen_base
from bitfit_peft.tuner.model import BitFitModel
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME

PEFT_TYPE = _registration.register()
_compat.install()
_moved_modules.install()  # 0.1.x module paths, with a DeprecationWarning, until 0.3.0

__all__ = [
    "BASE_ADAPTER_NAME",
    "BiasDeltas",
    "BitFitConfig",
    "BitFitError",
    "BitFitLayer",
    "BitFitModel",
    "PEFT_TYPE",
    "allow_base_mismatch",
    "cast_frozen_base",
    "hotswap_adapter",
    "save_pretrained",
    "__version__",
]
