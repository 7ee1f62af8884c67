"""Training step time and peak memory: full FT vs naive bias-freezing vs LoRA vs BEFT vs bitfit-peft.

All modes run in ONE process; step times are measured in interleaved rounds (round-robin over modes,
rotating the order each round) and reported as the median seconds-per-step over rounds. Peak memory is
measured one mode at a time:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the mode's model copy was made (= weights + grads + optimizer state + activations).
* CPU: a fresh subprocess per mode; peak RSS (``VmHWM``, reset via ``/proc/self/clear_refs`` after model
  setup) minus the RSS before the model was built. A tiny warm-up model of the same mode runs first so
  lazily-loaded code pages are not counted. Falls back to ``ru_maxrss`` if ``clear_refs`` is unavailable.

Usage::

    python benchmarks/train_speed.py                       # CPU shapes
    python benchmarks/train_speed.py --gpu --json out/train_speed.json
    python benchmarks/train_speed.py --modes full,bitfit --models bert
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CPU_BERT,
    CPU_QWEN,
    GPU_BERT_LARGE,
    GPU_QWEN_05B,
    ModelSpec,
    autocast_ctx,
    build_model,
    count_params,
    cuda_warmup,
    ensure_bitfit_importable,
    env_info,
    format_table,
    interleaved_timing,
    log,
    make_adamw,
    make_batch,
    median,
    pick_device,
    sync,
    write_json,
)

ALL_MODES = ["full", "naive_bias", "naive_bias_lowmem", "lora", "beft", "bitfit", "bitfit_lowmem"]
BITFIT_MODES = {"bitfit", "bitfit_lowmem"}
LOWMEM_MODES = {"naive_bias_lowmem", "bitfit_lowmem"}  # frozen base stored in bf16, trainable tensors fp32
HEAD_PREFIXES = ("classifier.", "score.")


# --------------------------------------------------------------------------------------------- modes


def setup_mode(mode: str, model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """Turn a fresh fp32 model into the trainable model for ``mode`` (mutates/wraps ``model``)."""
    from peft import LoraConfig, get_peft_model

    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode in ("naive_bias", "naive_bias_lowmem"):
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias") or n.startswith(HEAD_PREFIXES))
        if mode == "naive_bias_lowmem":  # the "same, frozen base stored in bf16" anchor
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        return model
    if mode == "lora":
        cfg = LoraConfig(task_type=spec.task_type, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        return get_peft_model(model, cfg)
    if mode == "beft":
        from peft import BeftConfig

        return get_peft_model(model, BeftConfig(task_type=spec.task_type, target_modules="all-linear"))
    if mode in BITFIT_MODES:
        import bitfit_peft
        from bitfit_peft import BitFitConfig

        pm = get_peft_model(model, BitFitConfig(task_type=spec.task_type))
        if mode == "bitfit_lowmem":
            bitfit_peft.tuner.lowmem.cast_frozen_base(pm, torch.bfloat16)
        return pm
    raise ValueError(f"unknown mode {mode!r}")


def uses_autocast(mode: str, device: torch.device, no_amp: bool = False) -> bool:
    """bf16 autocast: always on CUDA (unless ``no_amp``); on CPU only for the low-memory mode, whose bf16
    base needs it (as documented for ``cast_frozen_base``)."""
    if mode in LOWMEM_MODES:
        return True
    return device.type == "cuda" and not no_amp


def make_trainer(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, amp: bool
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """Return ``(step_fn, optimizer)``: one forward/backward/AdamW step per call."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(params)

    def step() -> None:
        with autocast_ctx(device, amp):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


# --------------------------------------------------------------------------------------------- memory


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_child(spec: ModelSpec, mode: str, steps: int) -> dict[str, Any]:
    """Runs inside the per-mode subprocess (CPU): peak RSS delta of model setup + training steps."""
    device = torch.device("cpu")
    # Warm-up on a tiny model of the same kind/mode so code pages and allocator arenas are faulted in.
    tiny = replace(
        spec,
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        vocab=64,
        batch=2,
        seq=8,
        kv_heads=1 if spec.kv_heads else None,
    )
    tm = setup_mode(mode, build_model(tiny, device), tiny)
    amp = uses_autocast(mode, device)
    tstep, _ = make_trainer(tm, make_batch(tiny, device), device, amp)
    for _ in range(2):
        tstep()
    del tm, tstep
    batch = make_batch(spec, device)
    gc.collect()
    rss0 = _rss_kb()
    model = setup_mode(mode, build_model(spec, device), spec)
    step, opt = make_trainer(model, batch, device, amp)
    gc.collect()
    rss_model = _rss_kb()
    method = "VmHWM after clear_refs" if _reset_hwm() else "ru_maxrss (includes model build)"
    for _ in range(steps):
        step()
    peak = _hwm_kb()
    return {
        "peak_mb": (peak - rss0) / 1024,
        "static_mb": (rss_model - rss0) / 1024,
        "mem_method": f"CPU subprocess, {method}",
    }


def measure_memory_cpu(spec: ModelSpec, mode: str, steps: int, threads: int) -> dict[str, Any]:
    """Spawn a fresh interpreter for one mode and return its memory numbers."""
    env = dict(os.environ)
    # Fixed mmap threshold: large tensors are mmapped and returned to the OS when freed.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_mem-child",
        json.dumps(asdict(spec)),
        mode,
        "--mem-steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON ") :])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {"error": "memory subprocess failed: " + " | ".join(tail)}


def measure_memory_cuda(
    base: torch.nn.Module,
    spec: ModelSpec,
    mode: str,
    batch: dict[str, torch.Tensor],
    steps: int,
    device: torch.device,
    no_amp: bool,
) -> dict[str, Any]:
    """Peak CUDA memory of one mode (its own model copy + grads + optimizer + activations)."""
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    before = torch.cuda.memory_allocated(device)
    model = setup_mode(mode, copy.deepcopy(base), spec)
    step, opt = make_trainer(model, batch, device, uses_autocast(mode, device, no_amp))
    gc.collect()
    static = torch.cuda.memory_allocated(device) - before
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del model, step, opt
    gc.collect()
    torch.cuda.empty_cache()
    return {"peak_mb": peak / 2**20, "static_mb": static / 2**20, "mem_method": "torch.cuda.max_memory_allocated delta"}


# --------------------------------------------------------------------------------------------- driver


def run_model(spec: ModelSpec, modes: list[str], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Memory phase (one mode at a time) then interleaved timing phase for one model shape."""
    amp = uses_autocast("full", device, args.no_amp)
    log(
        f"\n== {spec.name}: hidden={spec.hidden} layers={spec.layers} vocab={spec.vocab} "
        f"batch={spec.batch}x{spec.seq} ({spec.task_type}, amp={'bf16' if amp else 'off'})"
    )
    t0 = time.perf_counter()
    cuda_warmup(device)
    base = build_model(spec, device)
    batch = make_batch(spec, device)
    log(f"  built base in {time.perf_counter() - t0:.1f}s")
    res: dict[str, dict[str, Any]] = {m: {} for m in modes}

    # Memory, one mode at a time.
    if not args.skip_memory:
        for mode in modes:
            try:
                if device.type == "cuda":
                    r = measure_memory_cuda(base, spec, mode, batch, args.mem_steps, device, args.no_amp)
                else:
                    r = measure_memory_cpu(spec, mode, args.mem_steps, torch.get_num_threads())
            except Exception as e:  # keep other modes going (e.g. OOM, missing core)
                r = {"error": f"{type(e).__name__}: {e}"}
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
            res[mode].update(r)
            log(f"  mem {mode:14s} " + (f"peak {r['peak_mb']:.0f} MB" if "peak_mb" in r else r["error"]))

    # Timing: all modes resident, interleaved rounds.
    steps: dict[str, Callable[[], None]] = {}
    keep: list[Any] = []
    for mode in modes:
        if "error" in res[mode] and mode in BITFIT_MODES and "No module" in res[mode]["error"]:
            continue
        try:
            model = setup_mode(mode, copy.deepcopy(base), spec)
            mamp = uses_autocast(mode, device, args.no_amp)
            step, opt = make_trainer(model, batch, device, mamp)
            trainable, total = count_params(model)
            res[mode].update(trainable=trainable, total=total, autocast="bf16" if mamp else "off")
            steps[mode] = step
            keep.append((model, opt))
        except Exception as e:
            res[mode].setdefault("error", f"{type(e).__name__}: {e}")
            log(f"  setup {mode} failed: {res[mode]['error']}")
    del base
    gc.collect()
    ok = list(steps)
    if ok:
        log(f"  timing {len(ok)} modes: {args.rounds} rounds x {args.iters} steps (warmup {args.warmup})")
        errors: dict[str, str] = {}
        times = interleaved_timing(
            steps, device, args.rounds, args.iters, args.warmup, budget_s=args.budget, min_rounds=2, errors=errors
        )
        for mode, err in errors.items():
            res[mode].setdefault("error", err)
        for mode, ts in times.items():
            res[mode]["step_ms_rounds"] = [t * 1e3 for t in ts]
            res[mode]["step_ms"] = median(ts) * 1e3
    keep.clear()
    steps.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    ref = res.get("full", {})
    for mode in modes:
        r = res[mode]
        if "step_ms" in r and "step_ms" in ref:
            r["time_ratio"] = r["step_ms"] / ref["step_ms"]
        if "peak_mb" in r and ref.get("peak_mb"):
            r["mem_ratio"] = r["peak_mb"] / ref["peak_mb"]
    rows = [
        [
            m,
            res[m].get("trainable"),
            res[m].get("step_ms"),
            res[m].get("time_ratio"),
            res[m].get("peak_mb"),
            res[m].get("mem_ratio"),
            (res[m].get("error") or "")[:60],
        ]
        for m in modes
    ]
    log(format_table(["mode", "trainable", "step ms", "x full", "peak MB", "x full", "error"], rows))
    return {"spec": asdict(spec), "amp": "bf16" if amp else "fp32", "modes": res}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA with BERT-large / Qwen2-0.5B shapes")
    ap.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list from {ALL_MODES}")
    ap.add_argument("--models", default="bert,qwen", help="comma list: bert,qwen")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--iters", type=int, default=None, help="steps per mode per round (default 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per model before stopping")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on GPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--batch", type=str, default=None, help="override batch as BxS, e.g. 8x64")
    ap.add_argument("--json", default=None, help="write results JSON here")
    ap.add_argument("--_mem-child", dest="mem_child", nargs=2, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    have_bitfit = ensure_bitfit_importable()
    if args.mem_child:
        spec = ModelSpec(**json.loads(args.mem_child[0]))
        print("MEMJSON " + json.dumps(mem_child(spec, args.mem_child[1], args.mem_steps)), flush=True)
        return

    device = pick_device(args.gpu)
    args.rounds = args.rounds or 5
    args.iters = args.iters or (5 if args.gpu else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {ALL_MODES}")
    if not args.gpu and "naive_bias_lowmem" in modes:
        # CPU autocast does not run layer_norm in fp32: a bf16 norm weight with a trainable fp32 bias fails there
        log("naive_bias_lowmem is GPU-only (CPU autocast keeps layer_norm in bf16): skipping it")
        modes.remove("naive_bias_lowmem")
    if not have_bitfit and BITFIT_MODES & set(modes):
        log("bitfit_peft not importable: skipping " + ", ".join(sorted(BITFIT_MODES & set(modes))))
        modes = [m for m in modes if m not in BITFIT_MODES]
    if args.gpu:
        specs = {"bert": GPU_BERT_LARGE, "qwen": GPU_QWEN_05B}
    else:
        specs = {"bert": CPU_BERT, "qwen": CPU_QWEN}
    chosen = [specs[k.strip()] for k in args.models.split(",") if k.strip()]
    if args.batch:
        b, s = (int(x) for x in re.split("[x,]", args.batch))
        chosen = [replace(sp, batch=b, seq=s) for sp in chosen]

    payload: dict[str, Any] = {"benchmark": "train_speed", "env": env_info(device), "results": {}}
    payload["env"]["modes"] = modes
    log(f"device: {payload['env']['device']} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    for spec in chosen:
        try:
            payload["results"][spec.name] = run_model(spec, modes, device, args)
        except Exception as e:  # one model failing (e.g. OOM) must not lose the other
            log(f"  {spec.name} failed: {type(e).__name__}: {e}")
            payload["results"][spec.name] = {"spec": asdict(spec), "error": f"{type(e).__name__}: {e}"}
        write_json(args.json, payload)  # incremental: partial results survive a timeout
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
