"""Putting the original modules back: undo BitFit's wrapping after a refused load, or entirely.

Example:
    >>> import torch, bitfit_peft
    >>> from peft import get_peft_model
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> model = get_peft_model(net, bitfit_peft.BitFitConfig())
    >>> strip_wrappers(model.base_model.model)
    >>> type(model.base_model.model[0]).__name__
    'Linear'
"""

from __future__ import annotations

from peft.utils import ModulesToSaveWrapper
from torch import nn

from bitfit_peft.tuner.layer import BitFitLayer


def strip_wrappers(model: nn.Module) -> None:
    """Put every BitFit layer's base module and every head's original module back in place."""
    unwrap_new(model, set())


def wrapper_ids(model: nn.Module) -> set[int]:
    """``id`` of every BitFit layer and head wrapper of ``model`` (what :func:`unwrap_new` keeps after a failure)."""
    return {id(m) for m in model.modules() if isinstance(m, (BitFitLayer, ModulesToSaveWrapper))}


def unwrap_new(model: nn.Module, keep: set[int]) -> None:
    """Put back the original of every BitFit layer / head wrapper of ``model`` whose ``id`` is not in ``keep``.

    After a failed load: wrappers that load created are removed, so the model's structure is what it was."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, (BitFitLayer, ModulesToSaveWrapper)) and id(module) not in keep:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, child, None) is module:
                original = module.get_base_layer() if isinstance(module, BitFitLayer) else module.original_module
                setattr(parent, child, original)
