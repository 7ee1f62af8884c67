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

__version__ = "0.1.0"

from . import _compat, _registration
from .atomic_save import save_pretrained
from .config import BitFitConfig
from .errors import BitFitError
from .hotswap import hotswap_adapter
from .layer import BiasDeltas, BitFitLayer
from .lowmem import cast_frozen_base
from .model import BitFitModel
from .routing import BASE_ADAPTER_NAME


def allow_base_mismatch(config: BitFitConfig) -> BitFitConfig:
    """Mark ``config`` so loading skips the base-model fingerprint check (intentional transfer)."""
    config._skip_fingerprint = True
    return config


PEFT_TYPE = _registration.register()
_compat.install()

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
