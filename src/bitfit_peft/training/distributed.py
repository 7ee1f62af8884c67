"""Sharded BitFit training: an FSDP2 sharding plan, an FSDP1 wrap policy, a rank-0 save (``docs/distributed.md``).

* FSDP2 (:func:`shard_bitfit_model`): every transformer block becomes one ``fully_shard`` unit, and the deltas of
  that block one more unit of their own. So a bf16 base and the fp32 deltas never share a unit (FSDP2 wants one
  dtype per unit), the frozen base gets no gradient buffer, and each delta unit is gathered when its layers call
  it. ``accelerate launch`` with ``fsdp_version: 2`` gets the same layout from
  ``fsdp_transformer_layer_cls_to_wrap: <Block>,BiasDeltas`` (one unit per layer's deltas; not run here, as
  Accelerate turns FSDP on for accelerator devices only).
* Saving (:func:`save_sharded_adapter`, FSDP1/FSDP2/DeepSpeed/DDP): every rank calls it, rank 0 writes the normal
  adapter folder from the gathered tensors (the saved fingerprint reads base weights a rank alone cannot gather).
* FSDP1 (:func:`fsdp_auto_wrap_policy`): FSDP1 flattens each unit into one tensor, and a BitFit layer must read its
  delta where the base op runs, so the deltas stay in their blocks' units: FSDP1 needs ``use_orig_params=True``
  and then keeps a (sharded) gradient for every parameter of those units. ``use_orig_params=False`` is refused.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bitfit_peft.tuner.layer import BiasDeltas, BitFitLayer

__all__ = ["block_classes", "fsdp_auto_wrap_policy", "save_sharded_adapter", "shard_bitfit_model"]


def block_classes(model: nn.Module, names: Iterable[str] | None = None) -> tuple[type[nn.Module], ...]:
    """The transformer block classes of ``model``: ``names`` or, by default, transformers' ``_no_split_modules``.

    Example:
        >>> import torch
        >>> block_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["Linear"])
        (<class 'torch.nn.modules.linear.Linear'>,)
    """
    if names is None:
        found: list[str] = []
        for module in model.modules():
            found += [n for n in getattr(module, "_no_split_modules", None) or () if n not in found]
        names = found
    names = list(names)
    if not names:
        raise ValueError(
            "Cannot tell the transformer block classes of this model (it has no _no_split_modules); "
            "pass blocks=['MyDecoderLayer', ...]."
        )
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in by_name]
    if len(missing) == len(names):
        raise ValueError(f"None of the block classes {names} occurs in the model; pass blocks=[...].")
    return tuple(by_name[n] for n in names if n in by_name)


def _bitfit_layers(model: nn.Module) -> list[BitFitLayer]:
    layers = [m for m in model.modules() if isinstance(m, BitFitLayer)]
    if not layers:
        raise ValueError("The model has no BitFit layers; call get_peft_model(model, BitFitConfig(...)) first.")
    return layers


def shard_bitfit_model(
    model: nn.Module,
    mesh: Any = None,
    *,
    blocks: Iterable[str] | None = None,
    reshard_after_forward: bool | None = None,
    mp_policy: Any = None,
    delta_mp_policy: Any = None,
    offload_policy: Any = None,
) -> nn.Module:
    """Shard a BitFit ``PeftModel`` with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place; returns it.

    Bottom-up: per transformer block, one unit holding the deltas of the block's layers (``fully_shard`` of the
    list of their ``BiasDeltas``), then the block itself (its frozen base weights); the deltas outside any block
    form one more unit; last the root (embeddings outside blocks, the trainable head). ``mp_policy`` applies to the
    base units (e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` for an fp32 base computed in bf16);
    ``delta_mp_policy`` to the delta units (default: no cast, so deltas compute, reduce and update in fp32 on a
    bf16 base). Call it after ``torch.distributed.init_process_group`` and before building the optimizer.

    Example:
        >>> # torchrun --nproc_per_node 2 train.py, with in train.py:
        >>> # torch.distributed.init_process_group("nccl")        # "gloo" on CPU
        >>> # model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(...), BitFitConfig(...))
        >>> # shard_bitfit_model(model)                            # then AdamW(model.parameters()), train as usual
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("The model is already sharded with fully_shard; call shard_bitfit_model on the bare model.")
    layers = _bitfit_layers(model)
    blocks_of = block_classes(model, blocks)
    base_kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    delta_kwargs = {**base_kwargs, "mp_policy": delta_mp_policy or MixedPrecisionPolicy()}
    units, inside = [], set()
    for module in model.modules():  # outermost blocks only (pre-order: a parent comes before its children)
        if isinstance(module, blocks_of) and module not in inside:
            units.append(module)
            inside.update(module.modules())
    if not units:
        raise ValueError(f"No module of the block classes {[c.__name__ for c in blocks_of]} in the model.")
    for block in units:
        storages = [m.bitfit_delta for m in block.modules() if isinstance(m, BitFitLayer) and len(m.bitfit_delta)]
        if storages:
            fully_shard(storages, **delta_kwargs)
        fully_shard(block, **base_kwargs)
    rest = [la.bitfit_delta for la in layers if la not in inside and len(la.bitfit_delta)]
    if rest:
        fully_shard(rest, **delta_kwargs)
    fully_shard(model, **base_kwargs)
    return model


def fsdp_auto_wrap_policy(model: nn.Module, blocks: Iterable[str] | None = None) -> Callable[..., bool]:
    """FSDP1 ``auto_wrap_policy`` for a BitFit model: one unit per transformer block, one per trainable head.

    Use it with ``use_orig_params=True`` (FSDP1 flattens a unit into one tensor, and BitFit layers read their delta
    inside the block's unit): ``FullyShardedDataParallelPlugin(auto_wrap_policy=fsdp_auto_wrap_policy(model),
    use_orig_params=True)`` or ``FSDP(model, auto_wrap_policy=..., use_orig_params=True)``. Same units as PEFT's
    ``peft.utils.other.fsdp_auto_wrap_policy``, which ``Trainer`` applies by itself.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from bitfit_peft import BitFitConfig
        >>> net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), BitFitConfig())
        >>> policy = fsdp_auto_wrap_policy(net, ["Linear"])   # FSDP(net, auto_wrap_policy=policy, ...)
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    _bitfit_layers(model)
    blocks_of = block_classes(model, blocks)

    def wrap(module: nn.Module) -> bool:
        if isinstance(module, blocks_of):
            return True
        if isinstance(module, BiasDeltas):  # FSDP1 never calls it as a unit: it stays in its block's unit
            return False
        params = list(module.parameters(recurse=False))
        return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=wrap)


def save_sharded_adapter(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save the adapter of a BitFit model trained on several ranks once, from rank 0; call it on every rank.

    Gathers what the save reads (deltas, head, and the base weights the fingerprint samples): FSDP2, a full state
    dict on rank 0's CPU, swapped into the model there for the save; FSDP1, ``summon_full_params``; DeepSpeed ZeRO-3,
    ``deepspeed.zero.GatheredParameters``; replicated models (DDP, ZeRO-1/2) need nothing. ``model`` may be the
    wrapper (FSDP1, DDP, DeepSpeed engine) or the PeftModel. Rank 0 writes exactly what a single-process
    ``save_pretrained(save_directory, **kwargs)`` writes. Ends with a barrier.

    Example:
        >>> # after training under torchrun / accelerate launch, on every rank:
        >>> # save_sharded_adapter(model, "out/adapter")   # then PeftModel.from_pretrained(base, "out/adapter")
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("save_sharded_adapter needs an initialised process group; in one process: save_pretrained.")
    if "state_dict" in kwargs:
        raise TypeError("save_sharded_adapter gathers the state dict itself; do not pass state_dict=.")
    rank = dist.get_rank()
    inner = model
    while not hasattr(inner, "save_pretrained") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module  # FSDP1 / DDP / DeepSpeed engine
    if not hasattr(inner, "save_pretrained"):
        raise TypeError(f"Expected a PeftModel (or a wrapper of one), got {type(inner).__name__}.")
    if any(isinstance(m, FSDP) for m in model.modules()):
        # FSDP1's full state dict, and summon_full_params(rank0_only=True, offload_to_cpu=True), segfault on CPU
        # (torch 2.13): save the summoned parameters from the tree with its FSDP wrappers taken out
        with FSDP.summon_full_params(model, writeback=False):
            if rank == 0:
                with _without_fsdp1_wrappers(inner):
                    inner.save_pretrained(save_directory, **kwargs)
    elif any(isinstance(m, FSDPModule) for m in model.modules()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            with _full_parameters(inner, full):
                inner.save_pretrained(save_directory, state_dict=full, **kwargs)
    elif any(hasattr(p, "ds_id") for p in inner.parameters()):  # DeepSpeed ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(inner.parameters())):
            if rank == 0:
                inner.save_pretrained(save_directory, **kwargs)
    elif rank == 0:
        inner.save_pretrained(save_directory, **kwargs)
    dist.barrier()


@contextmanager
def _full_parameters(model: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Register the gathered tensors ``full`` in place of the model's sharded (DTensor) parameters, then restore."""
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        for prefix, module in model.named_modules(remove_duplicate=False):
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    key = f"{prefix}.{name}" if prefix else name
                    module._parameters[name] = nn.Parameter(full[key], requires_grad=param.requires_grad)
                    swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextmanager
def _without_fsdp1_wrappers(model: nn.Module) -> Iterator[None]:
    """Put each FSDP1 unit's own module back in its parent (so names and state dict are the model's), then undo."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    swapped = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, FSDP):
                    parent._modules[name] = child.module
                    swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
