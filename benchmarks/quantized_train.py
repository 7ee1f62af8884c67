"""Training on a quantized base: step time and peak memory of BitFit on fp32 / bf16 / NF4 / int8 bases vs QLoRA.

At the SmolLM2-135M shape (random weights, written once to a temporary checkpoint so ``from_pretrained`` can
quantize it), each arm runs in its own subprocess: load the base (quantized where the arm says), PEFT's
``prepare_model_for_kbit_training`` for the quantized arms, wrap it (BitFit with ``add_missing_bias``, or LoRA r8 on
the same projections = QLoRA), then AdamW steps on one causal-LM batch. Reported per arm: the median step time;
the peak RSS of the timed steps above the RSS after the model was built (``VmHWM`` after ``clear_refs``); the
base's weights as stored (``get_memory_footprint``); the trainable parameters and the adapter's fp32 bytes.
Ratios are against ``bitfit_fp32`` of the same run. "Adapters per GiB" is what a server holds resident:
1 GiB / adapter bytes (the same on a quantized base: the deltas stay fp32).

Usage::

    python benchmarks/quantized_train.py --json benchmarks/results/cpu/quantized_train.json
    python benchmarks/quantized_train.py --arms bitfit_fp32,bitfit_nf4 --steps 3 --layers 4   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("bitfit_fp32", "bitfit_bf16", "bitfit_nf4", "bitfit_int8", "lora_nf4")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True)  # fmt: skip


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_arm(arm: str, checkpoint: str, steps: int, warmup: int, batch: int, seq: int) -> dict[str, Any]:
    """One arm, in this (fresh) process."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    import bitfit_peft
    from bitfit_peft.compat.quantized import quantization_config

    torch.manual_seed(0)
    method, precision = arm.split("_")
    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    else:
        config = quantization_config(precision)
        base = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    weights_mb = base.get_memory_footprint() / 2**20  # parameters + buffers as stored (4-bit packed, int8, ...)
    if method == "bitfit":
        config = bitfit_peft.BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, target_modules=PROJECTIONS)
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=PROJECTIONS)
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    rss_model = _status_kb("VmRSS")

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the timed steps only
    times = [step() for _ in range(steps)]
    return {
        "arm": arm,
        "step_s": statistics.median(times),
        "peak_step_mb": (_status_kb("VmHWM") - rss_model) / 1024,
        "weights_mb": weights_mb,
        "trainable_params": trainable,
        "adapter_bytes_fp32": trainable * 4,
        "adapters_per_gib": (1 << 30) / (trainable * 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("ARM", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child[0], args.child[1], args.steps, args.warmup, args.batch, args.seq)))
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {','.join(ARMS)}")
    shape = {**SMOLLM2_135M, "num_hidden_layers": args.layers}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(tmp)
        for arm in arms:
            cmd = [sys.executable, __file__, "--child", arm, tmp, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{arm} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    reference = next((r for r in rows if r["arm"] == "bitfit_fp32"), rows[0])
    for row in rows:
        row["step_ratio"] = row["step_s"] / reference["step_s"]
        row["peak_step_ratio"] = row["peak_step_mb"] / reference["peak_step_mb"]
        row["weights_ratio"] = row["weights_mb"] / reference["weights_mb"]
    result = {
        "benchmark": "quantized_train",
        "shape": {"name": "SmolLM2-135M (random weights)", **shape, "batch": args.batch, "seq": args.seq},
        "reference": reference["arm"],
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "rows": rows,
    }
    print(f"{'arm':12s} {'step s':>8s} {'x':>6s} {'peak MB':>8s} {'x':>6s} {'weights MB':>10s} {'trainable':>10s} "
          f"{'adapters/GiB':>12s}")  # fmt: skip
    for r in rows:
        print(f"{r['arm']:12s} {r['step_s']:8.2f} {r['step_ratio']:6.2f} {r['peak_step_mb']:8.0f} "
              f"{r['peak_step_ratio']:6.2f} {r['weights_mb']:10.0f} {r['trainable_params']:10d} "
              f"{r['adapters_per_gib']:12.0f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
