"""Heads of another size than the base's: a 4-label adapter head on a 2-label base.

PEFT copies a ``modules_to_save`` head from the base's own module and then loads the adapter's tensors into the
copy, which fails when the sizes differ. The engine gives the base's head the adapter's shapes for the duration
of PEFT's load (:func:`head_shapes_as`) and fixes the Linear sizes of the copy afterwards (:func:`sync_linear_sizes`).
This is the one place that works around PEFT's head copying; the engine's direct commit builds heads of the right
size itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

__all__ = ["head_shapes_as", "last_linear", "sync_linear_sizes"]


def _original_tensor(root: nn.Module, dotted: str) -> tuple[nn.Module, str] | None:
    """Module and attribute of ``dotted`` in ``root``, stepping into the *original* module of head wrappers."""
    *path, attr = dotted.split(".")
    module = root
    for part in path:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        child = module._modules.get(part)
        if child is None:
            return None
        module = child
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    tensor = getattr(module, attr, None)
    return (module, attr) if isinstance(tensor, torch.Tensor) else None


@contextmanager
def head_shapes_as(root: nn.Module, shapes: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """Temporarily give the original head tensors of ``root`` the adapter's ``shapes`` (by model path)."""
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for dotted, shape in shapes.items():
            found = _original_tensor(root, dotted)
            if found is None:
                continue
            tensor = getattr(*found)
            if tuple(tensor.shape) != shape:
                swapped.append((tensor, tensor.data))
                tensor.data = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        yield
    finally:
        for tensor, data in swapped:
            tensor.data = data


def sync_linear_sizes(module: nn.Module) -> None:
    """Make every Linear's ``in_features`` / ``out_features`` describe its (possibly resized) weight."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.out_features, sub.in_features = sub.weight.shape


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(path, module)`` of the last Linear in ``module`` (its output layer), None if it has none."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found
