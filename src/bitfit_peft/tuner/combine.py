"""``add_weighted_adapter`` for BitFit: a new adapter whose deltas (and heads) are ``sum(w_i * adapter_i)``.

Heads (``modules_to_save``) are combined the same way when every adapter has one of the same shapes; otherwise the
call is refused, since a combined adapter with a silently untrained head would be wrong. Non-finite weights, and
combinations that overflow, are refused too; nothing is left behind by a refused call.

The model writes its own state (:meth:`~bitfit_peft.tuner.model.BitFitModel.add_weighted_adapter`: the config, the
injection, the rollback); this module checks the request, builds the config and computes the values.
"""

from __future__ import annotations

import copy
import math

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper

from bitfit_peft.errors import BitFitError
from bitfit_peft.tuner.config import BitFitConfig
from bitfit_peft.tuner.layer import layers_holding
from bitfit_peft.tuner.routing import check_adapter_name


def _heads(tuner: BaseTuner, adapter: str) -> dict[str, torch.nn.Module]:
    return {
        name: module.modules_to_save[adapter]
        for name, module in tuner.model.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save
    }


def _check(tuner: BaseTuner, adapters: list[str], weights: list[float], adapter_name: str) -> list[dict]:
    check_adapter_name(adapter_name)
    if adapter_name in tuner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} already exists; pick a new name or delete_adapter() it first.")
    if not adapters or len(adapters) != len(weights):
        raise ValueError("adapters and weights must be non-empty lists of equal length.")
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"Unknown adapter(s) {missing}; loaded: {sorted(tuner.peft_config)}.")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise BitFitError(f"add_weighted_adapter: weights must be finite numbers, got {bad}. Nothing was added.")
    heads = [_heads(tuner, a) for a in adapters]
    shapes = [{f"{n}.{k}": tuple(v.shape) for n, m in h.items() for k, v in m.state_dict().items()} for h in heads]
    if any(shapes) and any(s != shapes[0] for s in shapes):
        raise BitFitError(
            f"add_weighted_adapter: adapters {adapters} have different task heads (modules_to_save), so their heads "
            "cannot be combined; the result would have an untrained head. Combine adapters whose heads have the same "
            "modules and shapes, or delete the heads' adapters first. Nothing was added."
        )
    return heads


def combined_config(
    tuner: BaseTuner, adapters: list[str], weights: list[float], adapter_name: str
) -> tuple[BitFitConfig, list[dict[str, torch.nn.Module]]]:
    """Check the request and return ``(the combined adapter's config, each adapter's heads)``; changes nothing.

    The config targets every module any of ``adapters`` adapts (so the sum has a delta wherever one of them has).
    """
    heads = _check(tuner, adapters, weights, adapter_name)
    configs = [tuner.peft_config[a] for a in adapters]
    new_config = copy.deepcopy(configs[0])
    new_config.target_modules = sorted(set().union(*(layers_holding(tuner.model, a) for a in adapters)))
    new_config.bias_terms = "all"
    new_config.add_missing_bias = True
    new_config.layers_to_transform = None
    new_config.layers_pattern = None
    new_config.exclude_modules = None
    new_config.base_fingerprint = None
    return new_config, heads


def fill_weighted(
    tuner: BaseTuner, adapters: list[str], weights: list[float], adapter_name: str, heads: list[dict]
) -> None:
    """Write ``sum(w_i * adapter_i)`` into the (just injected) deltas and heads of ``adapter_name``.

    Raises BitFitError if a sum overflows; the caller then removes ``adapter_name``.
    """
    with torch.no_grad():
        for layer in layers_holding(tuner.model, adapter_name).values():
            target = layer.delta_of(adapter_name)
            target.zero_()
            for name, weight in zip(adapters, weights, strict=True):
                if name in layer.bitfit_delta:
                    target.add_(layer.delta_of(name).to(target.device), alpha=float(weight))
            if not torch.isfinite(target).all():
                raise BitFitError(
                    f"add_weighted_adapter: the weighted sum overflows in {adapter_name!r} (weights {weights}). "
                    "Use smaller weights. Nothing was added."
                )
        if not heads[0]:
            return
        for module_name, new_head in _heads(tuner, adapter_name).items():
            sources = [(float(w), h[module_name].state_dict()) for w, h in zip(weights, heads, strict=True)]
            combined = {key: sum(w * sd[key].float() for w, sd in sources) for key in new_head.state_dict()}
            if not all(torch.isfinite(v).all() for v in combined.values()):
                raise BitFitError(f"add_weighted_adapter: the weighted head overflows (weights {weights}).")
            for key, value in combined.items():
                new_head.state_dict()[key].copy_(value)
