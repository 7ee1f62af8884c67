"""bitfit-peft: BitFit (bias-only fine-tuning) as a first-class Hugging Face PEFT tuner type.

Importing this package registers ``PeftType.BITFIT`` with PEFT (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelFor*`` and transformers' ``model.load_adapter`` resolve
``"peft_type": "BITFIT"``.

Example:
    >>> import torch, bitfit_peft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 2)), bitfit_peft.BitFitConfig())
    >>> model.get_nb_trainable_parameters()
    (2, 20)
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
