"""Inference cost of mixed-task batches: 8 BitFit adapters routed per sample vs the base model.

Compares (all interleaved in one process, ratios to the plain base model):

* ``base``            the unwrapped transformers model
* ``bitfit_single``   bitfit-peft model with 8 adapters loaded, one active adapter for the whole batch
* ``bitfit_mixed``    ``model(**batch, adapter_names=[...])`` with 8 tasks round-robin over the batch
* ``bitfit_split``    per-task split: ``set_adapter(t)`` + forward of that task's sub-batch, for each task
* ``lora_single`` / ``lora_mixed``  PEFT LoRA r8 (all linear) with 8 adapters, same two patterns

for an encoder forward (BERT-shape classifier) and for ``generate`` (Qwen2-shape causal LM, greedy,
fixed number of new tokens). A one-off correctness check reports the max |mixed - split| logit difference.

Usage::

    python benchmarks/mixed_batch.py                 # CPU, small shapes
    python benchmarks/mixed_batch.py --gpu --json out/mixed_batch.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
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
    GPU_BERT_BASE,
    GPU_QWEN_05B,
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

N_TASKS = 8


def tasks() -> list[str]:
    return [f"task{i}" for i in range(N_TASKS)]


def build_peft(kind: str, base: torch.nn.Module, spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    """PeftModel over a copy of ``base`` with ``N_TASKS`` random adapters (kind: bitfit|lora)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    if kind == "bitfit":
        from bitfit_peft import BitFitConfig

        def make_cfg() -> Any:
            return BitFitConfig(task_type=spec.task_type)
    else:

        def make_cfg() -> Any:
            return LoraConfig(
                task_type=spec.task_type, r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False
            )

    names = tasks()
    pm = get_peft_model(copy.deepcopy(base), make_cfg(), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, make_cfg())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "bitfit_delta" in n:
                p.normal_(0.0, 0.02)
    pm = pm.to(dtype)
    pm.set_adapter(names[0])
    pm.eval()
    return pm


def split_indices(bs: int) -> dict[str, torch.Tensor]:
    """Sample i belongs to task i % N_TASKS."""
    return {t: torch.arange(i, bs, N_TASKS) for i, t in enumerate(tasks())}


def sample_names(bs: int) -> list[str]:
    return [tasks()[i % N_TASKS] for i in range(bs)]


# --------------------------------------------------------------------------------------------- forward


def forward_fns(
    models: dict[str, torch.nn.Module], base: torch.nn.Module, inputs: dict[str, torch.Tensor]
) -> dict[str, Callable[[], Any]]:
    """Closures for every forward pattern."""
    bs = inputs["input_ids"].shape[0]
    names = sample_names(bs)
    idx = {t: i.to(inputs["input_ids"].device) for t, i in split_indices(bs).items()}
    subs = {t: {k: v[i] for k, v in inputs.items()} for t, i in idx.items()}
    fns: dict[str, Callable[[], Any]] = {"base": lambda: base(**inputs).logits}
    for kind, pm in models.items():

        def single(pm: torch.nn.Module = pm) -> Any:
            return pm(**inputs).logits

        def mixed(pm: torch.nn.Module = pm) -> Any:
            return pm(**inputs, adapter_names=names).logits

        def split(pm: torch.nn.Module = pm) -> Any:
            parts = {}
            for t in tasks():
                pm.set_adapter(t)
                parts[t] = pm(**subs[t]).logits
            pm.set_adapter(tasks()[0])
            out = torch.empty(
                (bs, *parts[tasks()[0]].shape[1:]), dtype=parts[tasks()[0]].dtype, device=parts[tasks()[0]].device
            )
            for t, i in idx.items():
                out[i] = parts[t]
            return out

        fns[f"{kind}_single"] = single
        fns[f"{kind}_mixed"] = mixed
        fns[f"{kind}_split"] = split
    return fns


def gen_fns(
    models: dict[str, torch.nn.Module],
    base: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    new_tokens: int,
) -> dict[str, Callable[[], Any]]:
    """Closures for every generate pattern (greedy, exactly ``new_tokens`` new tokens)."""
    bs = inputs["input_ids"].shape[0]
    names = sample_names(bs)
    idx = {t: i.to(inputs["input_ids"].device) for t, i in split_indices(bs).items()}
    subs = {t: {k: v[i] for k, v in inputs.items()} for t, i in idx.items()}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    fns: dict[str, Callable[[], Any]] = {"base": lambda: base.generate(**inputs, **kw)}
    for kind, pm in models.items():

        def single(pm: torch.nn.Module = pm) -> Any:
            return pm.generate(**inputs, **kw)

        def mixed(pm: torch.nn.Module = pm) -> Any:
            return pm.generate(**inputs, adapter_names=names, **kw)

        def split(pm: torch.nn.Module = pm) -> Any:
            outs = []
            for t in tasks():
                pm.set_adapter(t)
                outs.append(pm.generate(**subs[t], **kw))
            pm.set_adapter(tasks()[0])
            return outs

        fns[f"{kind}_single"] = single
        fns[f"{kind}_mixed"] = mixed
        fns[f"{kind}_split"] = split
    return fns


def check_mixed(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |mixed - per-task split| over logits, per adapter kind (should be ~0)."""
    out: dict[str, float] = {}
    fns = forward_fns(models, models[next(iter(models))], inputs)
    for kind in models:
        try:
            mixed = fns[f"{kind}_mixed"]().float()
            split = fns[f"{kind}_split"]().float()
            out[f"{kind}_mixed_vs_split_maxdiff"] = (mixed - split).abs().max().item()
        except Exception as e:
            out[f"{kind}_check_error"] = f"{type(e).__name__}: {e}"
    return out


# --------------------------------------------------------------------------------------------- driver


def timed(fns: dict[str, Callable[[], Any]], args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """Patterns to time: LoRA's per-task split only with ``--lora-split`` (it is not the comparison)."""
    return {k: v for k, v in fns.items() if args.lora_split or k != "lora_split"}


def summarize(times: dict[str, list[float]], unit_scale: float, label: str) -> dict[str, Any]:
    ref = median(times["base"]) if times.get("base") else float("nan")
    res = {}
    rows = []
    for name, ts in times.items():
        med = median(ts)
        res[name] = {f"{label}": med * unit_scale, "rounds": [t * unit_scale for t in ts], "ratio": med / ref}
        rows.append([name, med * unit_scale, med / ref])
    log(format_table(["pattern", label, "x base"], rows))
    return res


def run_forward(
    spec: ModelSpec, kinds: list[str], device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    log(f"\n== forward {spec.name}: batch {spec.batch}x{spec.seq}, {N_TASKS} tasks, dtype {dtype}")
    base = build_model(spec, device).to(dtype).eval()
    models = {k: build_peft(k, base, spec, dtype) for k in kinds}
    inputs = {k: v for k, v in make_batch(spec, device).items() if k != "labels"}
    res: dict[str, Any] = {"spec": asdict(spec), "dtype": str(dtype)}
    with torch.no_grad():
        res["check"] = check_mixed(models, inputs)
        log(f"  check: {res['check']}")
        fns = timed(forward_fns(models, base, inputs), args)
        times = interleaved_timing(fns, device, args.rounds, args.iters, warmup=2, budget_s=args.budget)
    res["patterns"] = summarize(times, 1e3, "ms")
    del models, base
    return res


def run_generate(
    spec: ModelSpec, kinds: list[str], device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    log(
        f"\n== generate {spec.name}: batch {spec.batch}, prompt {spec.seq}, {args.new_tokens} new tokens, "
        f"{N_TASKS} tasks, dtype {dtype}"
    )
    base = build_model(spec, device).to(dtype).eval()
    models = {k: build_peft(k, base, spec, dtype) for k in kinds}
    inputs = {k: v for k, v in make_batch(spec, device).items() if k != "labels"}
    res: dict[str, Any] = {"spec": asdict(spec), "dtype": str(dtype), "new_tokens": args.new_tokens}
    with torch.no_grad():
        # Shorter warm-up generate per pattern, then 1 generate per pattern per round.
        for fn in timed(gen_fns(models, base, inputs, max(2, args.new_tokens // 4)), args).values():
            fn()
        fns = timed(gen_fns(models, base, inputs, args.new_tokens), args)
        times = interleaved_timing(fns, device, args.gen_rounds, 1, warmup=0, budget_s=args.gen_budget, min_rounds=1)
    res["patterns"] = summarize(times, 1.0, "s")
    del models, base
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, BERT-base bs64x128 / Qwen2-0.5B bs16")
    ap.add_argument("--kinds", default="bitfit,lora", help="adapter kinds: bitfit,lora")
    ap.add_argument("--parts", default="forward,generate")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--gen-rounds", type=int, default=None, help="generate rounds (GPU 2, CPU 5)")
    ap.add_argument("--lora-split", action="store_true", help="also time LoRA per-task split")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--budget", type=float, default=60.0, help="forward timing seconds before early stop")
    ap.add_argument("--gen-budget", type=float, default=90.0, help="generate timing s before early stop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.gpu)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    args.rounds = args.rounds or (10 if args.gpu else 5)
    args.iters = args.iters or (5 if args.gpu else 2)
    args.new_tokens = args.new_tokens or (128 if args.gpu else 16)
    args.gen_rounds = args.gen_rounds or (2 if args.gpu else 5)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "bitfit" in kinds and not ensure_bitfit_importable():
        log("bitfit_peft not importable: skipping bitfit")
        kinds.remove("bitfit")
    if args.gpu:
        fwd_spec, gen_spec = GPU_BERT_BASE, replace(GPU_QWEN_05B, batch=16, seq=64)
    else:
        fwd_spec, gen_spec = replace(CPU_BERT, batch=32), replace(CPU_QWEN, batch=8, seq=16)

    payload: dict[str, Any] = {"benchmark": "mixed_batch", "env": env_info(device), "n_tasks": N_TASKS, "results": {}}
    log(f"device: {payload['env']['device']} | torch {torch.__version__} | kinds {kinds}")
    for part in [p.strip() for p in args.parts.split(",")]:
        t0 = time.perf_counter()
        try:
            if part == "forward":
                payload["results"]["forward"] = run_forward(fwd_spec, kinds, device, dtype, args)
            elif part == "generate":
                payload["results"]["generate"] = run_generate(gen_spec, kinds, device, dtype, args)
            else:
                raise SystemExit(f"unknown part {part!r}")
        except Exception as e:
            log(f"  {part} failed: {type(e).__name__}: {e}")
            payload["results"][part] = {"error": f"{type(e).__name__}: {e}"}
        log(f"  ({part} took {time.perf_counter() - t0:.0f}s)")
        write_json(args.json, payload)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
