"""``add_weighted_adapter`` for BitFit: a new adapter whose deltas (and heads) are ``sum(w_i * adapter_i)``.

Heads (``modules_to_save``) are combined the same way when every adapter has one of the same shapes; otherwise the
call is refused, since a combined adapter with a silently untrained head would be wrong. Non-finite weights, and
combinations that overflow, are refused too; nothing is left behind by a refused call.
"""

from __future__ import annotations

import copy
import math

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper

from bitfit_peft.errors import BitFitError
from bitfit_peft.tuner.layer import layers_holding


def _heads(tuner: BaseTuner, adapter: str) -> dict[str, torch.nn.Module]:
    return {
        name: module.modules_to_save[adapter]
        for name, module in tuner.model.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save
    }


def _check(tuner: BaseTuner, adapters: list[str], weights: list[float], adapter_name: str) -> list[dict]:
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


def add_weighted_adapter(tuner: BaseTuner, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Create ``adapter_name`` = ``sum(w_i * adapter_i)`` over deltas and heads (see the module docstring)."""

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
    tuner.peft_config[adapter_name] = new_config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
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
            for module_name, new_head in _heads(tuner, adapter_name).items():
                if not heads[0]:
                    break
                sources = [(float(w), h[module_name].state_dict()) for w, h in zip(weights, heads, strict=True)]
                combined = {key: sum(w * sd[key].float() for w, sd in sources) for key in new_head.state_dict()}
                if not all(torch.isfinite(v).all() for v in combined.values()):
                    raise BitFitError(f"add_weighted_adapter: the weighted head overflows (weights {weights}).")
                for key, value in combined.items():
                    new_head.state_dict()[key].copy_(value)
    except Exception:
        if len(tuner.peft_config) > 1:
            tuner.delete_adapter(adapter_name)
        else:
            tuner.peft_config.pop(adapter_name)
        raise
    tuner._mark_only_adapters_as_trainable(tuner.model)
