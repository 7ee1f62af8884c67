"""Refuse, before anything is read or committed, an adapter head that cannot run on this base or costs too much.

An adapter's ``modules_to_save`` head (a classifier) may differ from the base's head in the number of labels only:
the first dimension of its output layer's weight and bias. Every other tensor must have the base's shape (inner
shape: the hidden size it reads; outer: the layers it stacks). A head with another inner shape would load (PEFT
copies whatever shapes the file declares) and then fail every batch holding one of its requests. The label count
and the head's bytes are capped (``Limits.max_labels``, ``Limits.max_head_bytes``): a 2 KB sparse file may declare a
2,000,000-label head. Only the safetensors header is read (:func:`~bitfit_peft.serving.adapter_files.head_shapes`).
"""

from __future__ import annotations

import math

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.heads_shape import last_linear
from bitfit_peft.serving.limits import Limits

__all__ = ["HeadError", "check_head"]


class HeadError(EngineError):
    """An adapter head of the wrong shape for this base, or over the label / byte caps."""


def _module(root: nn.Module, dotted: str) -> nn.Module | None:
    """The module at ``dotted`` in ``root``, stepping into the *original* module of head wrappers."""
    module = root
    for part in dotted.split(".") if dotted else []:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        module = module._modules.get(part)  # type: ignore[assignment]
        if module is None:
            return None
    return module.original_module if isinstance(module, ModulesToSaveWrapper) else module


def _head_path(key: str, heads: list[str]) -> str | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if any(prefix == h or prefix.endswith("." + h) for h in heads):
            return prefix
    return None


def check_head(name: str, shapes: dict[str, tuple[int, ...]], base: nn.Module, heads: list[str],
               limits: Limits) -> None:
    """Raise :class:`HeadError` unless the head tensors ``shapes`` (file key without PEFT's prefix -> shape) fit
    ``base``: only the output layer's first dimension may differ, labels and bytes under the caps."""
    labels: dict[str, set[int]] = {}
    total = 0
    for key, shape in shapes.items():
        head = _head_path(key, heads)
        owner_path, _, attr = key.rpartition(".")
        owner = _module(base, owner_path)
        tensor = getattr(owner, attr, None) if owner is not None else None
        if head is None or not isinstance(tensor, torch.Tensor):
            raise HeadError(f"Adapter {name!r}: head tensor {key!r} names no tensor of this base's head; it was "
                            "trained for another model.")
        expected = tuple(tensor.shape)
        output = last_linear(_module(base, head) or nn.Module())
        out_prefix = head + ("." + output[0] if output and output[0] else "")
        flexible = output is not None and owner_path == out_prefix and attr in ("weight", "bias")
        if shape != expected and not (flexible and len(shape) == len(expected) and shape[1:] == expected[1:]
                                      and shape and shape[0] > 0):
            raise HeadError(f"Adapter {name!r}: head tensor {key!r} has shape {list(shape)} but this base needs "
                            f"{list(expected)} (only the number of labels, the first dimension of the output layer, "
                            "may differ); it cannot run on this base.")
        if flexible:
            labels.setdefault(head, set()).add(shape[0])
        total += math.prod(shape) * tensor.element_size()
    for head, sizes in labels.items():
        if len(sizes) > 1:
            raise HeadError(f"Adapter {name!r}: the output layer of head {head!r} has a weight and a bias of "
                            f"different label counts {sorted(sizes)}.")
        count = sizes.pop()
        if count > limits.max_labels:
            raise HeadError(f"Adapter {name!r}: its head has {count:,} labels, over the server's max_labels limit "
                            f"of {limits.max_labels:,}.")
    if total > limits.max_head_bytes:
        raise HeadError(f"Adapter {name!r}: its head holds {total:,} bytes, over the server's max_head_bytes limit "
                        f"of {limits.max_head_bytes:,}.")
