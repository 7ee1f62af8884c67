"""BitFit layers: a frozen base module plus per-adapter bias deltas.

The deltas of all adapters of one layer live in one small *callable* :class:`BiasDeltas` module, so Accelerate's
offload hooks (which only fire when a module is called) load them like any other weight, and the module tree does
not grow with the number of loaded adapters.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from bitfit_peft.names import DELTA_KEY
from bitfit_peft.tuner.base_modules import (
    CONV_TYPES,
    FUSED_TYPES,
    bias_shape,
    can_merge_into,
    execution_device,
    in_out_features,
)
from bitfit_peft.tuner.routing import Routing


class MixedCall(NamedTuple):
    """One layer's part of a mixed-batch call, staged by the model before the call."""

    table: torch.Tensor | None  #: ``[1 + n_adapters, *bias_shape]`` (row 0 zeros); None: the layer builds it
    rows: torch.Tensor | None = None  #: this call's ``[batch, bias]`` rows, gathered for all layers at once


_NO_MIXED_CALL = MixedCall(None)


class BiasDeltas(nn.ParameterDict):
    """The additive bias deltas of every adapter of one layer: ``{adapter name: Parameter}``.

    One module per layer, not per adapter: hot-loading the 500th adapter walks no more modules than the first, and
    an extra adapter costs its vector plus one ``Parameter`` object. Calling it with one adapter name returns
    ``base_bias + delta`` (or ``delta`` when there is no base bias), computed in the delta's dtype so a bf16/fp16
    base keeps fp32 deltas and fp32 gradients; with a tuple of names it returns their raw deltas. The layer calls
    it whenever a hook sits on it, so Accelerate's offload hooks load the vectors (PEFT's BEFT keeps a
    ParameterDict that is never called, which breaks under disk offload).

    Example:
        >>> import torch
        >>> bank = BiasDeltas()
        >>> bank["task"] = torch.nn.Parameter(torch.zeros(3))
        >>> bank("task", torch.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """

    __call__ = nn.Module.__call__  # ParameterDict forbids calls; this one must be callable (see above)

    def forward(
        self, adapter_name: str | tuple[str, ...], base_bias: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        params = self._parameters
        if not isinstance(adapter_name, str):
            return [params[name] for name in adapter_name]
        delta = params[adapter_name]
        if base_bias is None:
            return delta
        return base_bias.to(delta.dtype) + delta


class BitFitLayer(BaseTunerLayer):
    """Mixin holding the deltas of every adapter for one base module."""

    adapter_layer_names = ("bitfit_delta",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bitfit_delta = BiasDeltas()
        # plain (unregistered) references for the hot path, which must not go through nn.Module.__getattr__
        object.__setattr__(self, "_base_ref", base_layer)
        object.__setattr__(self, "_bank", self.bitfit_delta)
        self._deltas = self.bitfit_delta._parameters  # {adapter name: delta Parameter}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._premerge_bias: torch.Tensor | None = None
        self._created_bias = False
        self.bias_group = kwargs.get("bias_group", "other")
        self._bitfit_routing: Routing | None = kwargs.get("routing")
        self._table_cache: tuple[Any, tuple, torch.Tensor] | None = None  # inference-time mixed-batch table
        #: the one per-call slot, written only through :meth:`set_call` (by the model around each call): a
        #: precomputed ``base + delta`` of the active adapter (single-adapter call), a :class:`MixedCall` (mixed
        #: batch), or None outside a call. Layer state changes that would make it stale clear it the same way.
        self._call: torch.Tensor | MixedCall | None = None
        self._bias_cast_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        base = self.get_base_layer()
        self._bias_shape = bias_shape(base)
        #: read by PEFT's generic code and tests (as on its LoRA/IA3/BEFT layers); not used by the forward
        self.in_features, self.out_features = in_out_features(base, self._bias_shape)
        self._view_shape = (
            (self._bias_shape[0],) + (1,) * (base.weight.dim() - 2)
            if isinstance(base, CONV_TYPES)
            else self._bias_shape
        )
        self._fused = type(base) in FUSED_TYPES and not (
            isinstance(base, (nn.LayerNorm, nn.GroupNorm)) and base.weight is None
        )
        self._op_kind = (
            "linear"
            if isinstance(base, nn.Linear)
            else "conv1d_hf"
            if isinstance(base, Conv1D)
            else "conv"
            if isinstance(base, CONV_TYPES)
            else "layer_norm"
            if isinstance(base, nn.LayerNorm)
            else "group_norm"
        )

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, init_weights: bool = True, inference_mode: bool = False) -> None:
        delta = nn.Parameter(torch.zeros(self._bias_shape, dtype=torch.float32))  # fp32 whatever the default dtype
        if not init_weights:
            with torch.no_grad():
                delta.normal_(0.0, 0.02)
        self.bitfit_delta[adapter_name] = delta
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # Only the new vector's flag: PEFT's set_adapter would revisit every adapter of the layer (O(adapters)).
        delta.requires_grad_(not inference_mode and adapter_name in self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        """Deltas follow the base layer's device but always stay floating point (fp32 unless set otherwise).

        On a base module under an Accelerate hook that is the hook's execution device: offloaded weights sit on
        ``meta`` (loaded per call), the delta stays in memory where the module computes."""
        base = self.get_base_layer()
        if device is None:
            device = execution_device(base)
        if device is None:
            for tensor in (getattr(base, "weight", None), getattr(base, "bias", None)):
                if isinstance(tensor, torch.Tensor):
                    device = tensor.device
                    break
        if device is None or device.type == "meta":
            return
        delta = self._deltas.get(adapter_name)
        if delta is not None and delta.device != device and delta.device.type != "meta":
            delta.data = delta.data.to(device)  # same Parameter object: optimizers keep their reference

    def set_call(self, state: torch.Tensor | MixedCall | None = None) -> None:
        """Set (or clear) this call's state (see ``_call``); a plain ``__dict__`` write, cheap on the hot path."""
        self.__dict__["_call"] = state

    def attach(self, adapter_name: str, delta: nn.Parameter) -> None:
        """Hold ``delta`` (used as is, not copied) as the delta of ``adapter_name``; drops this layer's caches."""
        self.bitfit_delta[adapter_name] = delta
        self.drop_cached_tables()

    def detach(self, adapter_name: str) -> None:
        """Forget the delta of ``adapter_name`` (nothing if this layer has none); drops this layer's caches."""
        if adapter_name in self._deltas:
            del self.bitfit_delta[adapter_name]
        self.drop_cached_tables()

    def drop_cached_tables(self) -> None:
        """Forget the cached mixed-batch table (it holds references to the deltas it was built from)."""
        self._table_cache = None

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.set_call(None)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.set_call(None)  # a precomputed bias belongs to the enabled state it was made for

    def delta_of(self, adapter_name: str) -> torch.Tensor:
        """The raw delta tensor (a Parameter) of one adapter."""
        return self._deltas[adapter_name]

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base bias (creating it if missing). ``unmerge`` restores it exactly."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.bitfit_delta]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not can_merge_into(base):
            raise ValueError(
                f"Cannot merge a BitFit delta into {type(base).__name__}: its forward has no bias term. "
                "Keep the adapter unmerged (exclude this module or set add_missing_bias=False)."
            )
        total = sum(self.delta_of(a).detach().float() for a in adapter_names)
        if safe_merge and not torch.isfinite(total).all():
            raise ValueError(
                f"NaN/Inf in BitFit adapter(s) {adapter_names}; refusing to merge. Re-train or reload the adapter."
            )
        if base.bias is None:
            weight = getattr(base, "weight", None)
            ref = weight if isinstance(weight, torch.Tensor) else total
            base.bias = nn.Parameter(
                torch.zeros(self._bias_shape, dtype=ref.dtype, device=ref.device), requires_grad=False
            )
            self._created_bias = True
        if self._premerge_bias is None:
            self._premerge_bias = base.bias.detach().clone()
        new_bias = base.bias.detach().float() + total.to(base.bias.device)
        base.bias.data = new_bias.to(base.bias.dtype)
        self.merged_adapters.extend(adapter_names)
        self.set_call(None)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        if self._created_bias:
            base.bias = None
        else:
            base.bias.data = self._premerge_bias.to(base.bias.device)
        self._premerge_bias = None
        self._created_bias = False
        self.merged_adapters = []
        self.set_call(None)

    def original_bias(self) -> torch.Tensor | None:
        """The base bias as it was before any merge (None if the base has none)."""
        if self._created_bias:
            return None
        if self._premerge_bias is not None:
            return self._premerge_bias
        return getattr(self.get_base_layer(), "bias", None)

    # ------------------------------------------------------------------ forward
    def _apply_op(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Run the base module's own op with ``bias`` in place of its bias (no extra kernel)."""
        base = self._base_ref
        weight = base._parameters["weight"]
        kind = self._op_kind
        if bias.dtype != weight.dtype and not (
            # CUDA autocast runs norms in fp32: hand them the fp32 bias as is (no round trip through bf16)
            kind in ("layer_norm", "group_norm") and x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
        ):
            bias = bias.to(weight.dtype)  # fp32 delta on a bf16/fp16 base: one tiny cast, gradient stays fp32
        if kind == "linear":
            return F.linear(x, weight, bias)
        if kind == "conv1d_hf":
            size_out = x.size()[:-1] + (base.nf,)
            return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)
        if kind == "conv":
            return base._conv_forward(x, weight, bias)
        if kind == "layer_norm":
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        return F.group_norm(x, base.num_groups, weight, bias, base.eps)

    def _add(self, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return out + delta.view(self._view_shape).to(out.dtype)

    def _mixed_table(self, adapters: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Stacked ``[1 + n_adapters, *bias_shape]`` table in ``dtype``, row 0 zeros.

        Cached (already on ``device`` and in the compute dtype) while no delta changes, so inference does one
        gather and one add per layer; when gradients are needed it is rebuilt each call so they flow back.
        """
        deltas = self._deltas
        present_names = tuple(a for a in adapters if a in deltas)
        if self._bank_hooked():  # offloaded: calling the bank lets its hook load the vectors
            loaded = dict(zip(present_names, self._bank(present_names), strict=True))
        else:
            loaded = deltas
        rows = [loaded[a] if a in loaded else None for a in adapters]
        present = next((r for r in rows if r is not None), None)
        if present is None:
            return torch.zeros((1 + len(adapters), *self._bias_shape), device=device, dtype=dtype)
        needs_grad = torch.is_grad_enabled() and any(r is not None and r.requires_grad for r in rows)
        key = (adapters, tuple(None if r is None else r._version for r in rows), device, dtype)
        cache = self._table_cache
        if (
            not needs_grad
            and cache is not None
            and cache[0] == key
            and all(a is b for a, b in zip(cache[1], rows, strict=True))  # same tensors, not just same ids
        ):
            return cache[2]
        zeros = torch.zeros_like(present)
        table = torch.stack([zeros] + [zeros if r is None else r for r in rows]).to(device=device, dtype=dtype)
        if not needs_grad:
            self._table_cache = (key, tuple(rows), table)
        return table

    def effective_bias_operands(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """``(base bias in the delta's dtype or None, delta)`` of the single active adapter, or None when this
        layer cannot take a precomputed bias (mixed routing, merged, disabled, several active adapters,
        unfused op, Accelerate hooks)."""
        if self._disable_adapters or self.merged_adapters or not self._fused:
            return None
        routing = self._bitfit_routing
        if routing is not None and routing.index is not None:
            return None
        active = self._active_adapter
        if active.__class__ is not str:
            if len(active) != 1:
                return None
            active = active[0]
        delta = self._deltas.get(active)
        base = self._base_ref
        if delta is None or "_hf_hook" in base.__dict__ or base._forward_pre_hooks or self._bank_hooked():
            return None
        bias = base._parameters.get("bias")
        if bias is None or (bias.dtype is delta.dtype and bias.device == delta.device):
            return bias, delta
        if bias.requires_grad:
            return None
        if torch.compiler.is_compiling():  # traced once; reading the eager cache would guard on it (recompiles)
            return bias.detach().to(device=delta.device, dtype=delta.dtype), delta
        cache = self._bias_cast_cache  # frozen base bias in another dtype (low-memory mode): cast once, reuse
        if (
            cache is None
            or cache[0] is not bias
            or cache[1] != bias._version
            or cache[2].dtype is not delta.dtype
            or cache[2].device != delta.device
        ):
            cache = (bias, bias._version, bias.detach().to(device=delta.device, dtype=delta.dtype))
            self._bias_cast_cache = cache
        return cache[2], delta

    def bitfit_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward with the active adapter(s) or the per-sample routing of a mixed batch.

        This is the hot path of every step: it reads plain attributes (``_base_ref``, ``_deltas``) rather than
        going through ``nn.Module.__getattr__``, and calls no extra module when nothing is hooked.
        """
        call = self._call
        if call is not None and call.__class__ is not MixedCall and not args and not kwargs:
            # precomputed by the model for this call, which already checked what the rest of this method checks
            # (enabled, unmerged, no mixed routing, one active adapter, fused op, no hooks): the base op only
            return self._apply_op(x, call)
        base = self._base_ref
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return base(x, *args, **kwargs)
        routing = self._bitfit_routing
        if routing is not None and routing.index is not None:
            if self.merged_adapters:
                raise RuntimeError("Mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
            out = base(x, *args, **kwargs)
            mixed = call if call.__class__ is MixedCall else _NO_MIXED_CALL
            rows = mixed.rows
            if rows is not None and rows.shape[0] == out.shape[0]:  # gathered for all layers at once
                if rows.dtype != out.dtype or rows.device != out.device:
                    rows = rows.to(device=out.device, dtype=out.dtype)
                extra = (1,) * (out.dim() - 1 - len(self._view_shape))
                return out + rows.reshape(out.shape[0], *extra, *self._view_shape)
            table = mixed.table
            if table is None:
                table = self._mixed_table(routing.adapters, out.device, out.dtype)
            elif table.dtype != out.dtype or table.device != out.device:
                table = table.to(device=out.device, dtype=out.dtype)
            gathered = table.index_select(0, routing.index_for(out.shape[0], out.device))
            if out.dim() == 2 and len(self._view_shape) == 1:
                return out + gathered
            extra = (1,) * (out.dim() - 1 - len(self._view_shape))
            return out + gathered.view(out.shape[0], *extra, *self._view_shape)
        if self.merged_adapters:
            return base(x, *args, **kwargs)
        active = self._active_adapter
        deltas = self._deltas
        if active.__class__ is str:
            active = (active,) if active in deltas else ()
        else:
            active = [a for a in active if a in deltas]
        if not active:
            return base(x, *args, **kwargs)
        if self._fused and not args and not kwargs and "_hf_hook" not in base.__dict__ and not base._forward_pre_hooks:
            bias = base._parameters.get("bias")
            hooked = self._bank_hooked()
            for name in active:
                if hooked:
                    bias = self._bank(name, bias)
                else:  # same as self._bank(name, bias), without the module-call overhead on the hot path
                    delta = deltas[name]
                    if bias is None:
                        bias = delta
                    else:
                        bias = (bias if bias.dtype is delta.dtype else bias.to(delta.dtype)) + delta
            return self._apply_op(x, bias)
        out = base(x, *args, **kwargs)
        hooked = self._bank_hooked()
        for name in active:
            out = self._add(out, self._bank(name) if hooked else deltas[name])
        return out

    def stage_mixed_table(self, adapters: tuple[str, ...]) -> None:
        """Build (or reuse) this call's delta table before the model runs; layers with hooks build it themselves."""
        table = None
        if not self._bank_hooked() and "_hf_hook" not in self._base_ref.__dict__:
            ref = next((self._deltas[a] for a in adapters if a in self._deltas), None)
            if ref is not None:
                table = self._mixed_table(adapters, ref.device, ref.dtype)
            else:
                weight = self._base_ref._parameters.get("weight")
                if weight is not None:
                    table = self._mixed_table(adapters, weight.device, weight.dtype)
        self.set_call(MixedCall(table))  # replaces a precomputed bias of an enclosing single-adapter call

    def _bank_hooked(self) -> bool:
        """Whether a hook (e.g. Accelerate offload) sits on the delta bank, so it must be called to load them."""
        bank = self._bank
        return "_hf_hook" in bank.__dict__ or bool(bank._forward_pre_hooks)


class BitFitWrapper(nn.Module, BitFitLayer):
    """A base module wrapped with BitFit deltas (any supported module type)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, init_weights: bool = True, **kwargs: Any) -> None:
        super().__init__()
        BitFitLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, init_weights=init_weights, inference_mode=kwargs.get("inference_mode", False))

    forward = BitFitLayer.bitfit_forward

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()


def layers_holding(model: nn.Module, adapter_name: str | None = None) -> dict[str, BitFitLayer]:
    """``{module name: layer}`` of every BitFit layer of ``model`` (holding ``adapter_name``, if given)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, BitFitLayer) and (adapter_name is None or adapter_name in module.bitfit_delta)
    }


def expected_tensors(
    model: nn.Module, adapter_name: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """``(delta shapes, head tensors)`` the model holds for ``adapter_name``, keyed like its state dict (one walk).

    Deltas: ``<module>.bitfit_delta.<adapter>`` of every BitFit layer holding the adapter; heads: the tensors of
    the adapter's ``modules_to_save`` copies (``<module>.modules_to_save.<adapter>.<param>``).
    """
    deltas: dict[str, tuple[int, ...]] = {}
    heads: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitFitLayer):
            if adapter_name in module.bitfit_delta:
                deltas[f"{name}.{DELTA_KEY}.{adapter_name}"] = module._bias_shape
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            prefix = f"{name}.modules_to_save.{adapter_name}."
            heads.update({prefix + k: v for k, v in module.modules_to_save[adapter_name].state_dict().items()})
    return deltas, heads
