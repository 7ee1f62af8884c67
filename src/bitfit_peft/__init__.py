"""bitfit-peft: BitFit (bias-only fine-tuning) as a first-class Hugging Face PEFT tuner type.

Importing this package registers ``PeftType.BITFIT`` with PEFT (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelFor*`` and transformers' ``model.load_adapter`` resolve
``"peft_type": "BITFIT"``. The import itself is light (no torch): the registration runs as soon as PEFT is
imported, or a public object below is used (:mod:`bitfit_peft._lazy`).

Example:
    >>> import torch, bitfit_peft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 2)), bitfit_peft.BitFitConfig())
    >>> model.get_nb_trainable_parameters()
    (2, 20)
"""

from __future__ import annotations

from typing import Any

from bitfit_peft import _lazy
from bitfit_peft.errors import BitFitError
from bitfit_peft.names import __version__

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


def __getattr__(name: str) -> Any:
    """The public objects (and sub-packages) load with the registration, on first use."""
    api = _lazy.register()
    if name in api.__all__ or name in ("_compat", "_registration", "_moved_modules"):  # the last: 0.2's private names
        return getattr(api, name)
    if name in globals():  # a sub-package the registration imported
        return globals()[name]
    raise AttributeError(f"module 'bitfit_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_lazy.install()
