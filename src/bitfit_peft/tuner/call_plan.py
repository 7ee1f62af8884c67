"""How one model call runs: precomputed biases for single-adapter calls, per-sample routing for mixed batches.

:class:`CallPlanMixin` is the part of :class:`~bitfit_peft.tuner.model.BitFitModel` that runs around every forward /
``generate``: PEFT enters ``_enable_peft_forward_hooks`` once per call, and this mixin either computes every layer's
``b0 + delta`` in one ``torch._foreach_add`` (so each layer runs only its base op) or, for a mixed batch, gathers
every layer's per-sample delta rows with one ``index_select`` (so each layer adds a ready tensor, and no Python
caches run inside the model, which keeps ``torch.compile`` from recompiling per task mix).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from bitfit_peft.tuner.heads import route_heads
from bitfit_peft.tuner.layer import BitFitLayer
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME, MixedCall, Routing

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without torch.distributed
    DTensor = ()


class CallPlanMixin:
    """Per-call setup of :class:`~bitfit_peft.tuner.model.BitFitModel` (see the module docstring)."""

    # provided by BitFitModel
    model: nn.Module
    peft_config: dict
    _routing: Routing
    _precomputing: bool
    _mixed_staged: list | None
    _batch_check_handle: Any
    _structure: Any
    _flat_tables: dict  # (device, dtype) -> (staged tables, their concatenation), reused while the tables are

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.precomputed_biases():
            return self.model(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route ``adapter_names=[...]`` (one per sample) through every layer with one index per call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            self._clear_routing()
            with self.precomputed_biases():
                yield
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list with one adapter name per sample, got {adapter_names!r}.")
        known = self.peft_config  # membership only: with 10,000 adapters a set per call would cost milliseconds
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME and n not in known})
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) in adapter_names: {unknown}. Loaded adapters: {sorted(known)[:20]}; "
                f"use {BASE_ADAPTER_NAME!r} for the bare base model."
            )
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} samples.")
        self._stage_mixed(list(adapter_names), batch)
        keep_for_backward = self.model.training and torch.is_grad_enabled()
        try:
            yield
        finally:
            self._routing.expected_batch = None
            if not keep_for_backward:  # gradient checkpointing re-runs forward during backward
                self._clear_routing()

    @torch.compiler.disable  # Python caches (tables, hook handle): eagerly, so compiled callers never guard them
    def _stage_mixed(self, adapter_names: list[str], batch: int | None) -> None:
        """Route the samples and stage every layer's gathered delta rows before the model runs."""
        layers, heads = self._call_structure()
        if any(layer.merged_adapters for layer in layers):
            raise ValueError("Mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        route_heads(heads, self._routing)
        self._install_batch_check()
        device = next(  # the layers' device (cached layer list: no model walk per call)
            (
                w.device
                for w in (la._base_ref._parameters.get("weight") for la in layers)
                if w is not None and w.device.type != "meta"
            ),
            None,
        )
        routing = self._routing
        routing.set(adapter_names, device=device)
        if batch is None:  # PeftModel*.forward keeps input_ids out of kwargs: the model's first call checks it
            routing.expected_batch = len(adapter_names)
        # Disabled layers run the bare base (nothing staged); every other layer gets one frozen MixedCall with its
        # rows gathered for all layers at once, so no Python caches run inside the model call
        layers = [layer for layer in layers if not layer.disable_adapters]
        tables = [layer.table_for_call(routing.adapters) for layer in layers]
        for layer, rows in zip(layers, self._gather_all_layers(tables, routing.index), strict=True):
            layer.stage_call(MixedCall(routing.index, routing.adapters, rows))
        self._mixed_staged = layers

    @contextmanager
    def call_set_aside(self) -> Iterator[None]:
        """Let another call run on this model in the middle of the call in progress, on the same thread.

        A serving engine runs short requests between the decoding steps of a long ``generate`` (from a logits
        processor): what the long call staged (routing, every layer's staged bias or rows) is put aside, the model
        is bare for the inner call, and the long call's state is back when the block ends, whatever the inner call
        did.

        Example:
            >>> import torch, bitfit_peft
            >>> from peft import get_peft_model
            >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 2)), bitfit_peft.BitFitConfig())
            >>> tuner, layer = model.base_model, model.base_model.model[0]
            >>> with tuner._enable_peft_forward_hooks(adapter_names=["default"]):
            ...     with tuner.call_set_aside():
            ...         inner = layer._staged_call  # nothing staged while set aside
            ...     layer._staged_call.adapters  # the outer call's mixed routing is back
            ('default',)
            >>> print(inner)
            None
        """
        routing = self._routing
        saved = (routing.adapters, routing.rows, routing.index, routing.expected_batch)
        layers = self._call_structure()[0]
        staged = [layer._staged_call for layer in layers]
        mixed, precomputing = self._mixed_staged, self._precomputing
        self._mixed_staged, self._precomputing = None, False
        routing.clear()
        for layer in layers:
            layer.stage_call(None)
        try:
            yield
        finally:
            self._clear_routing()
            routing.adapters, routing.rows, routing.index, routing.expected_batch = saved
            for layer, value in zip(layers, staged, strict=True):
                layer.stage_call(value)
            self._mixed_staged, self._precomputing = mixed, precomputing

    def _call_structure(self) -> tuple[list, list]:
        """The BitFit layers and head wrappers for this call.

        Eagerly: ``_structure()``'s cache. Inside a compiled frame the tree is walked instead: reading the lazily
        built cache there would guard on ``_structure_cache is None``, and the first compiled call fills it, so the
        second call recompiled. The walk is traced once and costs nothing at run time (Dynamo guards the modules).
        """
        if not torch.compiler.is_compiling():
            layers, heads, _ = self._structure()
            return layers, heads
        return layers_and_heads(self.model)

    def _clear_routing(self) -> None:
        self._routing.clear()
        staged = getattr(self, "_mixed_staged", None)
        if staged:
            for layer in staged:
                layer.stage_call(None)
            self._mixed_staged = None

    def _gather_all_layers(self, tables: list[torch.Tensor | None], index: torch.Tensor) -> list[torch.Tensor | None]:
        """Gather the per-sample delta rows of every layer's table with ONE ``index_select`` per (device, dtype).

        The tables are concatenated into one ``[1 + n_adapters, sum of bias sizes]`` tensor (cached while the
        tables are), the per-sample rows gathered once, and each layer gets a view of its columns: inside the
        model a layer then adds a ready ``[batch, bias]`` tensor (one kernel per layer instead of two). A layer
        without a table (None) gets None: it gathers itself as it runs.
        """
        groups: dict[tuple, list[int]] = {}
        for i, table in enumerate(tables):
            if table is not None:
                groups.setdefault((table.device, table.dtype), []).append(i)
        cache = self._flat_tables
        fresh: dict[tuple, tuple[list, torch.Tensor]] = {}
        rows: list[torch.Tensor | None] = [None] * len(tables)
        for key, members in groups.items():
            group = [tables[i] for i in members]
            hit = cache.get(key)
            same = hit is not None and len(hit[0]) == len(group)
            if same and all(a is b for a, b in zip(hit[0], group, strict=True)):
                flat = hit[1]
            else:
                flat = torch.cat([t.reshape(t.shape[0], -1) for t in group], dim=1)
            if not flat.requires_grad:  # built from cached (inference) tables: reusable next call
                fresh[key] = (group, flat)
            gathered = flat.index_select(0, index.to(flat.device))
            offset = 0
            for i, table in zip(members, group, strict=True):
                width = table[0].numel()
                rows[i] = gathered[:, offset : offset + width]
                offset += width
        self._flat_tables = fresh
        return rows

    def _install_batch_check(self) -> None:
        """One permanent pre-hook on the model (not one per call, which would make torch.compile recompile)."""
        if self._batch_check_handle is not None:
            return
        self._batch_check_handle = self.model.register_forward_pre_hook(
            partial(_check_first_batch, routing=self._routing), with_kwargs=True
        )

    @contextmanager
    def precomputed_biases(self) -> Iterator[None]:
        """For one model call, compute every layer's ``base bias + delta`` in a single ``torch._foreach_add``.

        Each wrapped layer then runs exactly the op of its base module (``F.linear(x, W, b + d)``), so a training
        step launches the same kernels as naive bias training plus one multi-tensor add, instead of one small add
        per layer. Gradients flow through the foreach add to the deltas. Layers that cannot use it (mixed
        routing, merged, offloaded, several active adapters, parameters FSDP holds sharded until the layer's own
        unit runs) keep the per-layer path. Re-entrant. Every forward of the model runs inside it.

        Example:
            >>> import torch, bitfit_peft
            >>> from peft import get_peft_model
            >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 2)), bitfit_peft.BitFitConfig())
            >>> layer = model.base_model.model[0]
            >>> with model.base_model.precomputed_biases():
            ...     staged = layer._staged_call  # base bias + delta, computed for all layers at once
            ...     out = model.base_model.model(torch.ones(1, 4))  # the layer runs F.linear(x, W, staged) only
            >>> torch.equal(staged, layer.base_layer.bias + layer.delta_of("default")), layer._staged_call
            (True, None)
        """
        if self._precomputing:
            yield
            return
        groups: dict[tuple, tuple[list, list, list]] = {}  # one foreach per (device, dtype): usually one
        direct = []
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for layer in self._call_structure()[0]:
            operands = layer.effective_bias_operands()
            if operands is None:
                if distributed and _flattened_away(layer):
                    raise RuntimeError(FSDP1_FLAT_ERROR)
                continue
            base, delta = operands
            if distributed and (_fsdp_managed(delta) or _fsdp_managed(base)):
                continue  # FSDP: only the layer's own unit sees the unsharded tensors (per-layer path)
            if base is None:
                direct.append((layer, delta))
                continue
            group = groups.get((delta.device, delta.dtype))
            if group is None:
                group = groups[(delta.device, delta.dtype)] = ([], [], [])
            group[0].append(layer)
            group[1].append(base)
            group[2].append(delta)
        if not groups and not direct:
            yield
            return
        staged = [layer for layer, _ in direct]
        for layers, bases, deltas in groups.values():
            for layer, eff in zip(layers, torch._foreach_add(bases, deltas), strict=True):
                layer.stage_call(eff)
            staged += layers
        for layer, delta in direct:
            layer.stage_call(delta)
        self._precomputing = True
        try:
            yield
        finally:
            self._precomputing = False
            for layer in staged:
                layer.stage_call(None)


FSDP1_FLAT_ERROR = (
    "FSDP1 with use_orig_params=False flattened the BitFit deltas out of their layers, which would then skip "
    "them silently; pass use_orig_params=True (Accelerate: fsdp_use_orig_params: true) or use FSDP2 "
    "(bitfit_peft.training.shard_bitfit_model or fsdp_version: 2), see docs/distributed.md."
)


def _fsdp_managed(tensor: torch.Tensor | None) -> bool:
    """Whether FSDP holds ``tensor``: an FSDP2 ``DTensor`` shard or an FSDP1 flattened original parameter."""
    return isinstance(tensor, DTensor) or getattr(tensor, "_fsdp_flattened", False)


def _flattened_away(layer: BitFitLayer) -> bool:
    """Whether FSDP1 (``use_orig_params=False``) wrapped the layer's deltas and flattened them out of the layer."""
    return "_flat_param" in layer._deltas  # FSDP1 registers its flat parameter on the wrapped module


def layers_and_heads(model: nn.Module) -> tuple[list, list]:
    """The BitFit layers and the head (auxiliary) wrappers of ``model``, in module order (one walk)."""
    layers, heads = [], []
    for module in model.modules():
        if isinstance(module, BitFitLayer):
            layers.append(module)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            heads.append(module)
    return layers, heads


_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values", "x")


@torch.compiler.disable
def _check_first_batch(module: nn.Module, args: tuple, kwargs: dict, routing: Routing) -> None:
    expected = routing.expected_batch
    if expected is None:
        return
    routing.expected_batch = None  # the first call of this forward only (generate calls the model repeatedly)
    tensors = [kwargs[k] for k in _BATCH_KEYS if isinstance(kwargs.get(k), torch.Tensor)]
    tensors += [a for a in args if isinstance(a, torch.Tensor)]
    if tensors and tensors[0].dim() >= 1 and tensors[0].shape[0] != expected:
        raise ValueError(
            f"adapter_names has {expected} entries but the batch has {tensors[0].shape[0]} samples; "
            "pass exactly one adapter name per sample."
        )


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None
