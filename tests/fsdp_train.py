"""Tiny BitFit training run for the FSDP tests (``tests/test_fsdp.py``).

``--mode single`` runs in one process; the other modes run under ``torchrun --nproc_per_node N`` (gloo, CPU):
``fsdp2`` (:func:`bitfit_peft.training.shard_bitfit_model`), ``fsdp2-plain`` (``fully_shard`` per encoder layer,
then the model, as torch's docs do), ``fsdp1`` (FSDP1 with :func:`bitfit_peft.training.fsdp_auto_wrap_policy`
and ``use_orig_params=True``), ``fsdp1-flat`` (FSDP1, ``use_orig_params=False``, deltas in units of their own:
must be refused), or under ``accelerate launch --config_file <fsdp yaml>`` (``accelerate``). Every run sees the
same global batches (rank ``r`` trains on the ``r``-th contiguous shard); rank 0 saves the gathered adapter to
``<out>/adapter``, and with ``--memory`` writes the per-rank parameter/gradient element counts to
``<out>/memory<r>.json``. ``--bf16-base`` casts the base to bf16 first (fp32 deltas beside it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_train import GLOBAL_BATCH, batches, build  # noqa: E402  (tests dir on sys.path)

from bitfit_peft.training import fsdp_auto_wrap_policy, save_sharded_adapter, shard_bitfit_model  # noqa: E402
from bitfit_peft.tuner.layer import BiasDeltas  # noqa: E402


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _counts(model: torch.nn.Module) -> dict[str, int]:
    """Elements this rank holds: parameters (shards) and gradients, after a backward."""
    params = list(model.parameters())
    flat = [h.flat_param for h in _fsdp1_handles(model)]  # FSDP1: the flat gradient covers frozen slots too
    return {
        "flat_grad_numel": sum(f.grad.numel() for f in flat if f.grad is not None),
        "flat_shard_numel": sum(f._local_shard.numel() for f in flat),
        "param_numel": sum(_local(p).numel() for p in params),
        "grad_numel": sum(_local(p.grad).numel() for p in params if p.grad is not None),
        "trainable_numel": sum(_local(p).numel() for p in params if p.requires_grad),
    }


def _fsdp1_handles(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    return _get_fsdp_handles(model)


def _wrap(mode: str, model: torch.nn.Module) -> torch.nn.Module:
    if mode == "fsdp2":
        return shard_bitfit_model(model)
    if mode == "fsdp2-plain":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    if mode == "fsdp1":
        policy, orig = fsdp_auto_wrap_policy(model), True
    else:  # fsdp1-flat: the deltas in units of their own, flattened
        flat = fsdp_auto_wrap_policy(model)

        def own_units(module: torch.nn.Module) -> bool:
            return isinstance(module, BiasDeltas) or flat(module, recurse=False, nonwrapped_numel=0)

        policy, orig = functools.partial(lambda_auto_wrap_policy, lambda_fn=own_units), False
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=orig, device_id=torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["single", "fsdp2", "fsdp2-plain", "fsdp1", "fsdp1-flat", "accelerate"])
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--bf16-base", action="store_true", help="a bf16 base beside the fp32 deltas")
    parser.add_argument("--accumulate", type=int, default=1, help="single: the global batch in this many slices")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    model = build(torch.bfloat16 if args.bf16_base else None)
    model.train()
    rank, world, accelerator = 0, 1, None
    if args.mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator()
        rank, world = accelerator.process_index, accelerator.num_processes
        if dist.is_initialized():  # Accelerate reports 1 process for DeepSpeed on CPU (1.15): ask torch
            rank, world = dist.get_rank(), dist.get_world_size()
        if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants the micro-batch size up front
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config.update(train_micro_batch_size_per_gpu=GLOBAL_BATCH // world, train_batch_size=GLOBAL_BATCH)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    elif args.mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        wrapped = _wrap(args.mode, model)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    else:
        wrapped = model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    shard = GLOBAL_BATCH // world

    for step, (ids, labels) in enumerate(batches(args.steps, args.seed)):
        ids, labels = ids[rank * shard : (rank + 1) * shard], labels[rank * shard : (rank + 1) * shard]
        if accelerator is not None:
            ids, labels = ids.to(accelerator.device), labels.to(accelerator.device)
        optimizer.zero_grad()
        # --accumulate N (one process): the ranks' slices one after the other, so every forward has a rank's shape
        for part_ids, part_labels in zip(ids.chunk(args.accumulate), labels.chunk(args.accumulate), strict=True):
            ones = torch.ones_like(part_ids)
            loss = wrapped(input_ids=part_ids, attention_mask=ones, labels=part_labels).loss / args.accumulate
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        optimizer.step()
        if args.memory and step == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, f"memory{rank}.json").write_text(json.dumps(_counts(wrapped)))

    out = os.path.join(args.out, "adapter")
    if args.mode == "single":
        model.save_pretrained(out)
    else:
        save_sharded_adapter(wrapped, out)  # on every rank; rank 0 writes
        if accelerator is not None:
            accelerator.end_training()
        else:
            dist.destroy_process_group()
    print(f"rank {rank}/{world} done")


if __name__ == "__main__":
    main()
    # Everything is written and the process group destroyed. Skip the interpreter's teardown: with torch 2.13 on
    # CPU, FSDP1's background threads can abort it ("terminate called without an active exception", exit -6)
    # after a complete, correct run, which made CI flaky.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
