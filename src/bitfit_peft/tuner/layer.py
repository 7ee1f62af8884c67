"""BitFit layers: a frozen base module plus per-adapter bias deltas.

The deltas of all adapters of one layer live in one small *callable* :class:`BiasDeltas` module, so Accelerate's
offload hooks (which only fire when a module is called) load them like any other weight, and the module tree does
not grow with the number of loaded adapters.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import ModulesToSaveWrapper
from torch import nn

from bitfit_peft.names import DELTA_KEY
from bitfit_peft.tuner.base_modules import (
    CONV_TYPES,
    bias_shape,
    can_merge_into,
    execution_device,
    fused_op,
    in_out_features,
    new_bias,
)
from bitfit_peft.tuner.merging import check_merge
from bitfit_peft.tuner.routing import MixedCall


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
        >>> deltas = BiasDeltas()
        >>> deltas["task"] = torch.nn.Parameter(torch.zeros(3))
        >>> deltas("task", torch.ones(3)).tolist()
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
    """Mixin holding the deltas of every adapter for one base module.

    The tuner is the only writer of this state: adapters come and go through :meth:`attach` / :meth:`detach` (or
    PEFT's ``update_layer`` / ``delete_adapter``), and the model stages each call through :meth:`stage_call`.
    """

    adapter_layer_names = ("bitfit_delta",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bitfit_delta = BiasDeltas()
        # Plain (unregistered) references for the hot path, which must not go through nn.Module.__getattr__ (it
        # only finds registered modules and parameters after three dict misses): the base module, and the one
        # alias of the delta storage, ``bitfit_delta``'s own ``{adapter name: delta Parameter}`` dict.
        object.__setattr__(self, "_base_ref", base_layer)
        self._deltas = self.bitfit_delta._parameters
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._premerge_bias: torch.Tensor | None = None
        self._created_bias = False
        self.bias_group = kwargs.get("bias_group", "other")
        self._table_cache: tuple[Any, tuple, torch.Tensor] | None = None  # inference-time mixed-batch table
        #: What the model staged for the call in progress, written only through :meth:`stage_call`: the
        #: precomputed ``base bias + delta`` of the single active adapter, this layer's :class:`MixedCall` of a
        #: mixed batch, or None (outside a call: the layer works it out itself). State changes that make it stale
        #: clear it the same way.
        self._staged_call: torch.Tensor | MixedCall | None = None
        self._bias_cast_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        base = self.get_base_layer()
        #: shape of the bias (and of every delta) of this layer, e.g. ``(768,)``
        self.bias_shape: tuple[int, ...] = bias_shape(base)
        #: read by PEFT's generic code and tests (as on its LoRA/IA3/BEFT layers); not used by the forward
        self.in_features, self.out_features = in_out_features(base, self.bias_shape)
        self._view_shape = (
            (self.bias_shape[0],) + (1,) * (base.weight.dim() - 2) if isinstance(base, CONV_TYPES) else self.bias_shape
        )
        #: the base op run with ``bias + delta`` as its bias (no extra kernel); None: the delta is added after it
        self._fused_op = fused_op(base)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, init_weights: bool = True, inference_mode: bool = False) -> None:
        delta = nn.Parameter(torch.zeros(self.bias_shape, dtype=torch.float32))  # fp32 whatever the default dtype
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

    def stage_call(self, staged: torch.Tensor | MixedCall | None = None) -> None:
        """Stage (or clear, with None) what this layer runs with in the call in progress (see ``_staged_call``).

        Called by the model around each call, and by the layer itself when its state changes; a plain
        ``__dict__`` write, cheap on the hot path.
        """
        self.__dict__["_staged_call"] = staged

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
        """Forget the cached mixed-batch table (it holds references to the deltas it was built from).

        Needed after adapters come or go, or to free memory after their values were overwritten; a table built
        from values since changed in place is never reused (it is keyed by the deltas' versions).
        """
        self._table_cache = None

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.drop_precomputed_bias()

    def drop_precomputed_bias(self) -> None:
        """Forget a staged ``base bias + delta``: it belongs to the adapter active when it was made. A staged
        :class:`MixedCall` stays (it does not depend on the active adapter)."""
        staged = self.__dict__  # a plain dict read and write: set_adapter calls this for every layer
        if staged["_staged_call"].__class__ is not MixedCall:
            staged["_staged_call"] = None

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.stage_call(None)  # what was staged belongs to the enabled state it was made for

    def delta_of(self, adapter_name: str) -> torch.Tensor:
        """The raw delta tensor (a Parameter) of one adapter."""
        return self._deltas[adapter_name]

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base bias (creating it if missing). ``unmerge`` restores it exactly.

        ``safe_merge`` refuses non-finite deltas or results first; without it nothing is checked (NaN/Inf, overflow in a
        half-precision bias and a non-finite base bias merge as they are)."""
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
        if safe_merge:
            check_merge(self, adapter_names, type(base).__name__)
        total = sum(self.delta_of(a).detach().float() for a in adapter_names)
        if base.bias is None:
            base.bias = new_bias(base, self.bias_shape)
            self._created_bias = True
        if self._premerge_bias is None:
            self._premerge_bias = base.bias.detach().clone()
        merged_bias = base.bias.detach().float() + total.to(base.bias.device)
        base.bias.data = merged_bias.to(base.bias.dtype)
        self.merged_adapters.extend(adapter_names)
        self.stage_call(None)

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
        self.stage_call(None)

    def original_bias(self) -> torch.Tensor | None:
        """The base bias as it was before any merge (None if the base has none)."""
        if self._created_bias:
            return None
        if self._premerge_bias is not None:
            return self._premerge_bias
        return getattr(self.get_base_layer(), "bias", None)

    # ------------------------------------------------------------------ forward
    def _add(self, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return out + delta.view(self._view_shape).to(out.dtype)

    def _mixed_table(self, adapters: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Stacked ``[1 + n_adapters, *bias_shape]`` table in ``dtype``, row 0 zeros.

        Cached (already on ``device`` and in the compute dtype) while no delta changes, so inference does one
        gather and one add per layer; when gradients are needed it is rebuilt each call so they flow back.
        """
        deltas = self._deltas
        present_names = tuple(a for a in adapters if a in deltas)
        if self._delta_storage_hooked():  # offloaded: calling bitfit_delta lets its hook load the vectors
            loaded = dict(zip(present_names, self.bitfit_delta(present_names), strict=True))
        else:
            loaded = deltas
        rows = [loaded[a] if a in loaded else None for a in adapters]
        present = next((r for r in rows if r is not None), None)
        if present is None:
            return torch.zeros((1 + len(adapters), *self.bias_shape), device=device, dtype=dtype)
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
        layer cannot take a precomputed bias (a mixed call staged, merged, disabled, several active adapters,
        unfused op, Accelerate hooks)."""
        if (
            self._disable_adapters
            or self.merged_adapters
            or self._fused_op is None
            or self._staged_call.__class__ is MixedCall
        ):
            return None
        active = self._active_adapter
        if active.__class__ is not str:
            if len(active) != 1:
                return None
            active = active[0]
        delta = self._deltas.get(active)
        base = self._base_ref
        if delta is None or "_hf_hook" in base.__dict__ or base._forward_pre_hooks or self._delta_storage_hooked():
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
        """Forward with what the model staged for this call, else with the active adapter(s).

        This is the hot path of every step: it reads plain attributes (``_base_ref``, ``_deltas``) rather than
        going through ``nn.Module.__getattr__``, and calls no extra module when nothing is hooked.
        """
        staged = self._staged_call
        if staged is not None:
            if staged.__class__ is MixedCall:  # the model checked enabled and unmerged when it staged the call
                return self._add_per_sample(self._base_ref(x, *args, **kwargs), staged)
            if not args and not kwargs:
                # the precomputed bias of the single active adapter: the model already checked what the rest of
                # this method checks (enabled, unmerged, one active adapter, fused op, no hooks): the base op only
                return self._fused_op(self._base_ref, x, staged)
        base = self._base_ref
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return base(x, *args, **kwargs)
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
        hooked = self._delta_storage_hooked()  # then bitfit_delta is called, so its hook loads the vectors
        if (
            self._fused_op is not None
            and not args
            and not kwargs
            and "_hf_hook" not in base.__dict__
            and not base._forward_pre_hooks
        ):
            bias = base._parameters.get("bias")
            for name in active:
                if hooked:
                    bias = self.bitfit_delta(name, bias)
                else:  # same as self.bitfit_delta(name, bias), without the module-call overhead on the hot path
                    delta = deltas[name]
                    if bias is None:
                        bias = delta
                    else:
                        bias = (bias if bias.dtype is delta.dtype else bias.to(delta.dtype)) + delta
            return self._fused_op(base, x, bias)
        out = base(x, *args, **kwargs)
        for name in active:
            out = self._add(out, self.bitfit_delta(name) if hooked else deltas[name])
        return out

    def _add_per_sample(self, out: torch.Tensor, call: MixedCall) -> torch.Tensor:
        """``out`` plus each sample's delta row.

        ``out``'s first dimension may be a multiple of the batch: beam search, ``num_return_sequences`` and
        flattened ``(batch * seq, hidden)`` inputs all repeat each sample contiguously (``repeat_interleave``),
        so the rows are added by broadcasting over the repeats (no gather, no expanded index).
        """
        rows = call.rows
        if rows is None:  # offloaded / hooked: the deltas are loaded now, so the table is built now
            table = self._mixed_table(call.adapters, out.device, out.dtype)
            rows = table.index_select(0, call.index.to(out.device))
        elif rows.dtype != out.dtype or rows.device != out.device:
            rows = rows.to(device=out.device, dtype=out.dtype)
        batch, n_rows = rows.shape[0], out.shape[0]
        per_sample = (batch, *(1,) * (out.dim() - 1 - len(self._view_shape)), *self._view_shape)
        if n_rows == batch:
            return out + rows.reshape(per_sample)
        if torch.compiler.is_compiling():
            torch._check(n_rows % batch == 0)
        elif n_rows % batch:
            raise RuntimeError(
                f"Mixed-adapter batch: got {batch} adapter_names but a layer saw {n_rows} rows, which is not a "
                "multiple. Pass exactly one adapter name per input sample."
            )
        repeated = out.reshape(batch, n_rows // batch, *out.shape[1:]) + rows.reshape(batch, 1, *per_sample[1:])
        return repeated.reshape(out.shape)

    def table_for_call(self, adapters: tuple[str, ...]) -> torch.Tensor | None:
        """This layer's ``[1 + n_adapters, *bias_shape]`` delta table for a mixed call over ``adapters``, built (or
        reused) before the model runs; None for a hooked layer, which builds it as it runs (its deltas load then)."""
        base = self._base_ref
        if self._delta_storage_hooked() or "_hf_hook" in base.__dict__:
            return None
        deltas = self._deltas
        ref = next((deltas[a] for a in adapters if a in deltas), None)
        if ref is None:
            ref = base._parameters.get("weight")
        return None if ref is None else self._mixed_table(adapters, ref.device, ref.dtype)

    def _delta_storage_hooked(self) -> bool:
        """Whether a hook (e.g. Accelerate offload) sits on bitfit_delta, so it must be called to load them."""
        storage = self._modules[DELTA_KEY]  # a plain dict read: ``self.bitfit_delta`` would go through __getattr__
        return "_hf_hook" in storage.__dict__ or bool(storage._forward_pre_hooks)


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
                deltas[f"{name}.{DELTA_KEY}.{adapter_name}"] = module.bias_shape
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            prefix = f"{name}.modules_to_save.{adapter_name}."
            heads.update({prefix + k: v for k, v in module.modules_to_save[adapter_name].state_dict().items()})
    return deltas, heads
