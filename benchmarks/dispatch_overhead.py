"""Where the per-step overhead over naive bias training comes from: dispatched ops and a launch-bound proxy.

Two measurements per training mode (full FT, naive bias-freezing, bitfit-peft, PEFT LoRA r8, PEFT BEFT):

* **Dispatched ops** of one forward + backward + AdamW step, counted with a ``TorchDispatchMode`` (exact and
  device independent: on a GPU every one of them is at least one kernel launch). The table lists each mode's
  ops that naive bias training does not run.
* **Step time on a deep, thin model** (24 layers, hidden 32, batch 2 x 8 tokens): the arithmetic is negligible, so
  the time is Python + dispatch overhead per wrapped layer, which is what dominates a GPU step whose kernels are
  small (the regime where bitfit-peft was measured slower than naive on an H200 before the precomputed biases).

Usage::

    python benchmarks/dispatch_overhead.py [--gpu] [--json benchmarks/results/cpu/dispatch_overhead.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CountOps,
    ModelSpec,
    build_model,
    ensure_bitfit_importable,
    env_info,
    format_table,
    interleaved_timing,
    log,
    make_batch,
    median,
    pick_device,
    write_json,
)
from train_speed import make_trainer, setup_mode  # noqa: E402

MODES = ["full", "naive_bias", "bitfit", "lora", "beft"]
THIN = ModelSpec("bert-thin-24L", "bert_cls", 32, 24, 2, 64, 128, batch=2, seq=8)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_bitfit_importable()
    device = pick_device(args.gpu)
    steps, ops = {}, {}
    for mode in MODES:
        model = setup_mode(mode, build_model(THIN, device), THIN)
        step, _ = make_trainer(model, make_batch(THIN, device), device, amp=False)
        for _ in range(3):
            step()
        counter = CountOps()
        with counter:
            step()
        steps[mode], ops[mode] = step, counter.ops
    times = interleaved_timing(steps, device, args.rounds, args.iters, warmup=1)
    ref_ops, ref_t = ops["naive_bias"], median(times["naive_bias"])
    rows, result = [], {}
    for mode in MODES:
        extra = ops[mode] - ref_ops
        fewer = ref_ops - ops[mode]
        t = median(times[mode])
        result[mode] = {
            "ops_per_step": sum(ops[mode].values()),
            "ops_not_in_naive": dict(extra.most_common()),
            "naive_ops_not_run": dict(fewer.most_common()),
            "step_ms": t * 1e3,
            "time_vs_naive": t / ref_t,
            "rounds_ms": [x * 1e3 for x in times[mode]],
        }
        top = ", ".join(f"{k.removeprefix('aten.')} x{v}" for k, v in extra.most_common(4)) or "-"
        rows.append([mode, sum(ops[mode].values()), sum(extra.values()), top, t * 1e3, t / ref_t])
    log(format_table(["mode", "ops/step", "ops beyond naive", "most common extra", "step ms", "x naive"], rows))
    write_json(args.json, {"benchmark": "dispatch_overhead", "env": env_info(device), "spec": THIN.__dict__,
                           "results": result})  # fmt: skip


if __name__ == "__main__":
    main()
