"""Tiny BitFit training run for the DDP tests (``tests/test_ddp.py``).

Runs as one process (``python tests/ddp_train.py``), under ``torchrun --nproc_per_node N`` (``--mode ddp``, gloo,
plain ``DistributedDataParallel``) or under ``accelerate launch`` (``--mode accelerate``). Every run sees the same
global batches; rank ``r`` of ``N`` trains on the ``r``-th contiguous shard, so gradient averaging over ranks equals
the single-process gradient of the whole batch. Each rank saves its adapter to ``<out>/rank<r>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_tiny_model  # noqa: E402  (tests dir on sys.path)
from peft import get_peft_model  # noqa: E402

from bitfit_peft import BitFitConfig  # noqa: E402

GLOBAL_BATCH = 8
SEQ = 6


def batches(steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(5, 100, (GLOBAL_BATCH, SEQ), generator=gen)
        labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=gen)
        out.append((ids, labels))
    return out


def tiny_base(dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The tiny BERT these runs train (no dropout, fixed seed), cast to ``dtype`` if given."""
    base = make_tiny_model("bert", task="seq_cls", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return base.to(dtype) if dtype else base


def build(dtype: torch.dtype | None = None) -> torch.nn.Module:
    """:func:`tiny_base` with BitFit; the deltas stay fp32 on a cast base, as PEFT's autocast does."""
    return get_peft_model(tiny_base(dtype), BitFitConfig(task_type="SEQ_CLS"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["single", "ddp", "accelerate"], default="single")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    model = build()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rank, world = 0, 1
    accelerator = None
    if args.mode == "ddp":
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif args.mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    else:
        wrapped = model
    assert GLOBAL_BATCH % world == 0
    shard = GLOBAL_BATCH // world

    for ids, labels in batches(args.steps, args.seed):
        ids, labels = ids[rank * shard : (rank + 1) * shard], labels[rank * shard : (rank + 1) * shard]
        loss = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        optimizer.zero_grad()
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()

    target = accelerator.unwrap_model(wrapped) if accelerator is not None else model
    target.save_pretrained(os.path.join(args.out, f"rank{rank}"), is_main_process=True)
    if args.mode == "ddp":
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    elif accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    print(f"rank {rank}/{world} done")


if __name__ == "__main__":
    main()
