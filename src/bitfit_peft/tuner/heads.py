"""Per-sample task heads (``modules_to_save``) in mixed-task batches.

PEFT's :class:`~peft.utils.ModulesToSaveWrapper` (the per-adapter classifier head of ``SEQ_CLS`` /
``TOKEN_CLS``) only follows ``adapter_names`` when a tuner injects them, and then only for Linear/Embedding/Conv
heads of equal size. :func:`route_heads` (called by the core on every mixed-batch call: nothing to enable) makes
every head wrapper read the core's per-sample routing instead:
each sample goes through its own adapter's head copy (``"__base__"`` and adapters without a copy through the
original module). Heads of different output sizes (2-way and 4-way classifiers) are allowed: their outputs are
zero-padded along the last dimension to the widest head in the batch; slice each row to its task's
``num_labels``. Gradients flow to each head from its own samples only, so it also works for multi-task training.

Example:
    >>> import torch, bitfit_peft
    >>> from peft import get_peft_model
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> net.add_module("head", torch.nn.Linear(4, 2))
    >>> model = get_peft_model(net, bitfit_peft.BitFitConfig(target_modules=["0"], modules_to_save=["head"]),
    ...                        adapter_name="sst2")
    >>> model.add_adapter("spam", bitfit_peft.BitFitConfig(target_modules=["0"], modules_to_save=["head"]))
    >>> with torch.no_grad():  # make spam's head copy differ from sst2's
    ...     _ = model.base_model.model.head.modules_to_save["spam"].bias.add_(1.0)
    >>> x = torch.ones(3, 4)
    >>> mixed = model(x, adapter_names=["sst2", "spam", "__base__"])  # each row through its own head copy
    >>> model.set_adapter("spam")
    >>> torch.allclose(mixed[1], model(x[1:2])[0]), torch.allclose(mixed[0], mixed[1])
    (True, False)
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from peft.utils import ModulesToSaveWrapper
from torch import nn

from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME, Routing

__all__ = ["enable_head_routing", "head_modules", "routing_of"]


def routing_of(peft_model: nn.Module) -> Routing:
    """The core's shared per-sample :class:`~bitfit_peft.tuner.routing.Routing` of a BitFit ``PeftModel``."""
    tuner = getattr(peft_model, "base_model", peft_model)
    routing = getattr(tuner, "_routing", None)
    if not isinstance(routing, Routing):
        raise TypeError(f"{type(peft_model).__name__} is not a BitFit PeftModel (no per-sample routing found).")
    return routing


def head_modules(peft_model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    """``{module name: wrapper}`` of every ``modules_to_save`` wrapper (the per-adapter heads)."""
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _sample_names(routing: Routing, n_rows: int) -> list[str]:
    assert routing.rows is not None and routing.adapters is not None
    names = [BASE_ADAPTER_NAME if r == 0 else routing.adapters[r - 1] for r in routing.rows]
    if n_rows == len(names):
        return names
    if n_rows % len(names):
        raise RuntimeError(
            f"Mixed-adapter batch: {len(names)} adapter_names but a head saw {n_rows} rows (not a multiple)."
        )
    repeat = n_rows // len(names)
    return [n for n in names for _ in range(repeat)]


def _routed_forward(self: ModulesToSaveWrapper, *args: Any, routing: Routing, **kwargs: Any) -> Any:
    explicit = kwargs.pop("adapter_names", None)
    if self.disable_adapters or not args or not isinstance(args[0], torch.Tensor):
        return ModulesToSaveWrapper.forward(self, *args, **kwargs)
    if explicit is None and routing.index is None:  # single-adapter call: stays traceable by torch.compile
        return ModulesToSaveWrapper.forward(self, *args, **kwargs)
    return _per_sample_heads(self, args, kwargs, explicit, routing)


@torch.compiler.disable  # groups samples by name in Python: run eagerly instead of recompiling per task mix
def _per_sample_heads(
    self: ModulesToSaveWrapper, args: tuple, kwargs: dict, explicit: Any, routing: Routing
) -> torch.Tensor:
    x = args[0]
    names = list(explicit) if explicit is not None else _sample_names(routing, x.shape[0])

    def module_for(name: str) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    if len(groups) == 1:
        return module_for(names[0])(x, *args[1:], **kwargs)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, rows in groups.items():
        index = torch.tensor(rows, dtype=torch.long, device=x.device)
        out = module_for(name)(x.index_select(0, index), *args[1:], **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"Per-sample head routing needs tensor outputs, got {type(out).__name__}.")
        outputs.append((index, out))
    width = max(out.shape[-1] for _, out in outputs)
    first = outputs[0][1]
    result = first.new_zeros((x.shape[0], *first.shape[1:-1], width))
    for index, out in outputs:
        if out.shape[-1] < width:
            out = F.pad(out, (0, width - out.shape[-1]))
        result = result.index_copy(0, index, out.to(result.dtype))
    return result


def enable_head_routing(peft_model: nn.Module) -> int:
    """Deprecated, and no longer needed: every ``adapter_names=[...]`` call routes the heads per sample.

    Still routes every head wrapper of ``peft_model`` (idempotent) and returns how many were patched; it will be
    removed in the next release. Drop the call.
    """
    warnings.warn(
        "enable_head_routing() is deprecated and no longer needed: BitFit routes the heads (modules_to_save) per "
        "sample on every adapter_names=[...] call. Remove the call; it goes away in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return route_heads(peft_model, routing_of(peft_model))


def route_heads(model: nn.Module | Iterable[nn.Module], routing: Routing) -> int:
    """Make every ``modules_to_save`` wrapper under ``model`` (or in a list of wrappers) follow ``routing``.

    Returns how many were patched.
    """
    patched = 0
    wrappers = head_modules(model).values() if isinstance(model, nn.Module) else model
    for wrapper in wrappers:
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        if getattr(wrapper, "_bitfit_head_routing", None) is routing:
            continue
        wrapper.forward = types.MethodType(partial(_routed_forward, routing=routing), wrapper)  # type: ignore
        wrapper._bitfit_head_routing = routing
        patched += 1
    return patched
