"""Merging BitFit deltas into the base biases: PEFT's merge, with BitFit's checks before anything changes.

:class:`MergeMixin` is the part of :class:`~bitfit_peft.tuner.model.BitFitModel` behind ``merge_adapter`` and
``merge_and_unload``: every module must use a bias in its forward (else a merged delta would be ignored), with
``safe_merge`` every module is checked before any merge (finite deltas, a finite result in the base's dtype, a
finite base bias), and biases that merging created are described
in the model's config where it can (so a plain transformers reload keeps them).

Example:
    >>> import torch, bitfit_peft
    >>> from peft import get_peft_model
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> model = get_peft_model(net, bitfit_peft.BitFitConfig(add_missing_bias=True, init_weights=False))
    >>> merged = model.merge_and_unload(safe_merge=True)
    >>> merged[0].bias is not None
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from bitfit_peft.tuner.base_modules import bias_shape, can_merge_into, new_bias


class MergeMixin:
    """``merge_adapter`` / ``merge_and_unload`` of :class:`~bitfit_peft.tuner.model.BitFitModel` (see above)."""

    # provided by BitFitModel
    active_adapters: list[str]
    bitfit_layers: Any

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name, layer in self.bitfit_layers().items():
            base = layer.get_base_layer()
            if not can_merge_into(base):
                raise ValueError(
                    f"Cannot merge: {name} ({type(base).__name__}) has no bias in its forward, so a merged delta "
                    "would be ignored. Keep the adapter unmerged, or exclude this module from the adapter."
                )

    def _check_finite(self, adapter_names: list[str] | None, allow_nonfinite_base: bool = False) -> None:
        """``safe_merge``: :func:`check_merge` of every module, before anything is merged."""
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        for module_name, layer in self.bitfit_layers().items():
            present = [a for a in names if a in layer.bitfit_delta]
            if present:
                check_merge(layer, present, module_name, allow_nonfinite_base)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, allow_nonfinite_base: bool = False
    ) -> None:
        """Merge adapter(s) into the base biases. ``safe_merge`` checks every module first (see
        :meth:`_check_finite`); without it nothing is checked: NaN/Inf deltas, overflow in a half-precision base
        and a non-finite base bias all merge as they are."""
        if safe_merge:
            self._check_finite(adapter_names, allow_nonfinite_base)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Any = None,
        allow_nonfinite_base: bool = False,
    ):
        """Merge the deltas into the base biases (created where missing) and return the plain model.

        ``safe_merge`` refuses, before anything changes, NaN/Inf deltas, a result that is not finite in the base's
        dtype and (unless ``allow_nonfinite_base``) a base bias that is not finite already. Without it nothing is
        checked.
        """
        if safe_merge:
            self._check_finite(adapter_names, allow_nonfinite_base)
        created = [
            n for n, layer in self.bitfit_layers().items() if getattr(layer.get_base_layer(), "bias", None) is None
        ]
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=False, adapter_names=adapter_names)
        if created:
            _sync_bias_config_flags(model, created)
        return model


def check_merge(layer: Any, adapters: list[str], where: str, allow_nonfinite_base: bool = False) -> None:
    """Refuse (``ValueError``, nothing changed) to merge ``adapters`` into ``layer`` (named ``where``) when a delta
    holds NaN/Inf, when the result is not finite in the base bias's dtype (e.g. fp32 deltas that overflow an fp16
    base), or when the base bias is not finite already (unless ``allow_nonfinite_base``)."""
    total = sum(layer.delta_of(a).detach().float() for a in adapters)
    if not torch.isfinite(total).all():
        raise ValueError(
            f"NaN/Inf in BitFit adapter(s) {adapters} ({where}); refusing to merge. Nothing was merged. Re-train or "
            "reload the adapter."
        )
    base = layer.get_base_layer()
    bias = base.bias if getattr(base, "bias", None) is not None else new_bias(base, layer.bias_shape)
    if not torch.isfinite(bias).all():
        if allow_nonfinite_base:
            return
        raise ValueError(
            f"The base bias of {where} already holds NaN/Inf; refusing to merge into it. Nothing was merged. Fix "
            "the base, or pass allow_nonfinite_base=True to merge anyway."
        )
    if not torch.isfinite((bias.detach().float() + total.to(bias.device)).to(bias.dtype)).all():
        raise ValueError(
            f"Merging {adapters} into {where} overflows its {bias.dtype} bias (a delta reaches "
            f"{float(total.abs().max()):.3g}); refusing to merge. Nothing was merged. Keep the adapter unmerged, or "
            "load the base in a wider dtype (float32 / bfloat16)."
        )


def _sync_bias_config_flags(model: nn.Module, created: list[str]) -> None:
    """After merging created biases, make the config describe them so plain transformers reloads them.

    Llama-family configs have ``attention_bias`` / ``mlp_bias``: when set, every projection of that family gets
    a (zero) bias, so the merged deltas survive ``save_pretrained`` → ``from_pretrained``.
    """
    config = getattr(model, "config", None)
    families = {
        "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp_bias": ("gate_proj", "up_proj", "down_proj"),
    }
    leftover = set(created)
    for flag, leaves in families.items():
        hits = [n for n in created if n.rsplit(".", 1)[-1] in leaves]
        if not hits or config is None or not hasattr(config, flag):
            continue
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in leaves and isinstance(module, nn.Linear) and module.bias is None:
                module.bias = new_bias(module, bias_shape(module))
        setattr(config, flag, True)
        leftover -= set(hits)
    if leftover:
        warnings.warn(
            f"merge_and_unload created biases that {type(model).__name__}'s config cannot describe "
            f"(e.g. {sorted(leftover)[:3]}): they are in the returned model, but a plain transformers reload from "
            "save_pretrained will drop them. Keep the adapter unmerged to share it.",
            stacklevel=3,
        )
