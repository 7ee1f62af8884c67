"""Inference cost of mixed-task batches: 8 BitFit adapters routed per sample vs the base model.

Compares (all interleaved in one process, ratios to the plain base model):

* ``base``            the unwrapped transformers model
* ``bitfit_single``   bitfit-peft model with 8 adapters loaded, one active adapter for the whole batch
* ``bitfit_mixed``    ``model(**batch, adapter_names=[...])`` with 8 tasks round-robin over the batch
* ``bitfit_split``    per-task split: ``set_adapter(t)`` + forward of that task's sub-batch, for each task
* ``lora_single`` / ``lora_mixed``  PEFT LoRA r8 (all linear) with 8 adapters, same two patterns

for an encoder forward (BERT-shape classifier) and for ``generate`` (Qwen2-shape causal LM, greedy,
fixed number of new tokens). A one-off correctness check reports the max |mixed - split| logit difference.

With ``--compile`` the forward part also times ``torch.compile`` variants after the eager patterns, in a second
interleaved stage with the eager ``base`` as anchor:

* ``base_compiled``            ``torch.compile(base)``
* ``bitfit_single_compiled``   ``peft_model.get_base_model().compile()`` (in place, the documented pattern: PEFT's
  per-call Python stays eager, the network body is compiled), one active adapter
* ``bitfit_mixed_compiled``    the same compiled model with ``adapter_names=[...]`` (one list object, reused)
* ``bitfit_single_compiled_after_mixed``  single-adapter calls again, once the mixed calls were compiled too

each with two ratios: ``x base`` (eager base of that stage) and ``x base_compiled`` (the fair comparison).
Stage 1 times base/single compiled in a fresh Dynamo state, stage 2 adds the mixed calls (Dynamo's caches are
per code object, so mixed-call graph breaks and recompiles can change what single calls run afterwards).
It records compile time per pattern, the max |compiled - eager| logit difference, and Dynamo counters: frames
compiled on the first call, frames compiled again afterwards (= recompiles; should be 0 while timing) and
graph breaks with their reasons. A pattern that fails to compile is recorded with its error and skipped.

``--shape qwen05b`` runs ``generate`` at the Qwen2-0.5B shape (hidden 896, 24 layers, vocab 151936),
batch 16: on CPU a one-off data point at the issue's shape (short prompt, few new tokens).

JSON is rewritten after every stage and timing round, and on SIGTERM (``timeout``) the partial results are
written before exiting, so a time-boxed run keeps what it measured.

Usage::

    python benchmarks/mixed_batch.py                 # CPU, small shapes
    python benchmarks/mixed_batch.py --compile --threads 1 --json benchmarks/results/cpu/mixed_batch.json
    python benchmarks/mixed_batch.py --shape qwen05b --threads 1 --json benchmarks/results/cpu/mixed_batch_qwen05b.json
    python benchmarks/mixed_batch.py --gpu --compile --json out/mixed_batch.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import signal
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
    Flush,
    ModelSpec,
    build_model,
    ensure_bitfit_importable,
    env_info,
    interleaved_timing,
    log,
    make_batch,
    pick_device,
    summarize,
    write_json,
)
from mixed_batch_compile import run_compiled  # noqa: E402

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


class Terminated(BaseException):  # noqa: N818 - not an Exception, so ``except Exception`` cannot swallow it
    """Raised by the SIGTERM handler (``timeout``) so the running part can write what it has."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum} (time limit); results are partial")


def timed(fns: dict[str, Callable[[], Any]], args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """Patterns to time: LoRA's per-task split only with ``--lora-split`` (it is not the comparison)."""
    return {k: v for k, v in fns.items() if args.lora_split or k != "lora_split"}


def run_forward(
    spec: ModelSpec,
    kinds: list[str],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    res: dict[str, Any],
    flush: Flush,
) -> None:
    log(f"\n== forward {spec.name}: batch {spec.batch}x{spec.seq}, {N_TASKS} tasks, dtype {dtype}")
    base = build_model(spec, device).to(dtype).eval()
    models = {k: build_peft(k, base, spec, dtype) for k in kinds}
    inputs = {k: v for k, v in make_batch(spec, device).items() if k != "labels"}
    res.update({"spec": asdict(spec), "dtype": str(dtype)})
    with torch.no_grad():
        res["check"] = check_mixed(models, inputs)
        log(f"  check: {res['check']}")
        flush()
        fns = timed(forward_fns(models, base, inputs), args)
        errors: dict[str, str] = {}

        def on_round(t: dict[str, list[float]]) -> None:
            res["patterns"] = summarize(t, 1e3, "ms", quiet=True)
            flush()

        times = interleaved_timing(fns, device, args.rounds, args.iters, 2, args.budget, 2, errors, on_round)
        res["patterns"] = summarize(times, 1e3, "ms")
        if errors:
            res["errors"] = errors
        flush()
        if args.compile:
            names = sample_names(inputs["input_ids"].shape[0])
            run_compiled(models, base, inputs, names, device, args, res, flush)
    del models, base


def run_generate(
    spec: ModelSpec,
    kinds: list[str],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    res: dict[str, Any],
    flush: Flush,
) -> None:
    log(
        f"\n== generate {spec.name}: batch {spec.batch}, prompt {spec.seq}, {args.new_tokens} new tokens, "
        f"{N_TASKS} tasks, dtype {dtype}"
    )
    t0 = time.perf_counter()
    base = build_model(spec, device).to(dtype).eval()
    models = {k: build_peft(k, base, spec, dtype) for k in kinds}
    inputs = {k: v for k, v in make_batch(spec, device).items() if k != "labels"}
    res.update({"spec": asdict(spec), "dtype": str(dtype), "new_tokens": args.new_tokens})
    log(f"  models built in {time.perf_counter() - t0:.0f}s")

    def pick(fns: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
        fns = timed(fns, args)
        if args.gen_patterns:
            keep = {"base", *args.gen_patterns}
            fns = {k: v for k, v in fns.items() if k in keep}
        return fns

    with torch.no_grad():
        # Shorter warm-up generate per pattern, then 1 generate per pattern per round.
        t0 = time.perf_counter()
        errors: dict[str, str] = {}
        warm = pick(gen_fns(models, base, inputs, max(2, args.new_tokens // 4)))
        interleaved_timing(warm, device, 0, 1, warmup=1, errors=errors)
        log(f"  warm-up generate took {time.perf_counter() - t0:.0f}s")
        fns = {k: v for k, v in pick(gen_fns(models, base, inputs, args.new_tokens)).items() if k not in errors}

        def on_round(t: dict[str, list[float]]) -> None:
            res["patterns"] = summarize(t, 1.0, "s", quiet=True)
            flush()

        times = interleaved_timing(fns, device, args.gen_rounds, 1, 0, args.gen_budget, 1, errors, on_round)
    res["patterns"] = summarize(times, 1.0, "s")
    if errors:
        res["errors"] = errors
    del models, base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, BERT-base bs64x128 / Qwen2-0.5B bs16")
    ap.add_argument(
        "--shape",
        choices=("default", "qwen05b", "bertbase", "smoke"),
        default="default",
        help="default: CPU small / GPU issue shapes; qwen05b: generate only, Qwen2-0.5B shape bs16 (CPU: "
        "prompt 16, 8 new tokens, 2 rounds); bertbase: forward only, BERT-base dims x128 tokens (CPU: batch 16, "
        "3 rounds); smoke: tiny shapes, a few seconds per part",
    )
    ap.add_argument("--kinds", default="bitfit,lora", help="adapter kinds: bitfit,lora")
    ap.add_argument("--parts", default=None, help="forward,generate (default both; qwen05b: generate)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--gen-rounds", type=int, default=None, help="generate rounds (GPU 2, CPU 5)")
    ap.add_argument("--gen-patterns", default=None, help="only these generate patterns (+ base), comma list")
    ap.add_argument("--lora-split", action="store_true", help="also time LoRA per-task split")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None, help="generate prompt length")
    ap.add_argument("--budget", type=float, default=60.0, help="forward timing seconds before early stop")
    ap.add_argument("--gen-budget", type=float, default=90.0, help="generate timing s before early stop")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time torch.compile(base) / peft_model.get_base_model().compile() forward (single and mixed)",
    )
    ap.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode (default | reduce-overhead | max-autotune-no-cudagraphs | ...)",
    )
    ap.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="seconds of compiling after which the remaining compiled patterns are skipped",
    )
    ap.add_argument("--compile-warmup", type=int, default=3, help="alternating warm-up calls after compiling")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def shapes(args: argparse.Namespace) -> tuple[ModelSpec, ModelSpec]:
    """(forward spec, generate spec) for ``--shape`` / ``--gpu``."""
    if args.shape == "smoke":
        return (
            replace(CPU_BERT, batch=16, seq=32, layers=2),
            replace(CPU_QWEN, batch=8, seq=8, layers=2),
        )
    if args.gpu:
        fwd_spec, gen_spec = GPU_BERT_BASE, replace(GPU_QWEN_05B, batch=16, seq=64)
    elif args.shape == "qwen05b":
        fwd_spec, gen_spec = replace(GPU_QWEN_05B, batch=16, seq=16), replace(GPU_QWEN_05B, batch=16, seq=16)
    elif args.shape == "bertbase":
        fwd_spec, gen_spec = replace(GPU_BERT_BASE, batch=16), replace(CPU_QWEN, batch=8, seq=16)
    else:
        fwd_spec, gen_spec = replace(CPU_BERT, batch=32), replace(CPU_QWEN, batch=8, seq=16)
    if args.prompt_len:
        gen_spec = replace(gen_spec, seq=args.prompt_len)
    return fwd_spec, gen_spec


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.compile and not args.gpu:
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = args.threads  # shared CPU: no wider compile worker pool
    device = pick_device(args.gpu)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    q05 = args.shape == "qwen05b" and not args.gpu
    smoke = args.shape == "smoke"
    bertbase = args.shape == "bertbase" and not args.gpu
    args.rounds = args.rounds or (2 if smoke else 10 if args.gpu else 3 if bertbase else 5)
    args.iters = args.iters or (1 if smoke or bertbase else 5 if args.gpu else 2)
    args.new_tokens = args.new_tokens or (4 if smoke else 128 if args.gpu else 8 if q05 else 16)
    args.gen_rounds = args.gen_rounds or (2 if smoke or args.gpu or q05 else 5)
    args.parts = args.parts or (
        "generate" if args.shape == "qwen05b" else "forward" if args.shape == "bertbase" else "forward,generate"
    )
    args.gen_patterns = [p.strip() for p in args.gen_patterns.split(",") if p.strip()] if args.gen_patterns else None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "bitfit" in kinds and not ensure_bitfit_importable():
        log("bitfit_peft not importable: skipping bitfit")
        kinds.remove("bitfit")
    fwd_spec, gen_spec = shapes(args)

    payload: dict[str, Any] = {"benchmark": "mixed_batch", "env": env_info(device), "n_tasks": N_TASKS, "results": {}}
    payload["env"]["shape"] = args.shape
    payload["env"]["argv"] = sys.argv[1:] if argv is None else list(argv)
    log(f"device: {payload['env']['device']} | torch {torch.__version__} | kinds {kinds}")
    signal.signal(signal.SIGTERM, _raise_terminated)

    def flush() -> None:
        write_json(args.json, payload)

    for part in [p.strip() for p in args.parts.split(",")]:
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        payload["results"][part] = res
        try:
            if part == "forward":
                run_forward(fwd_spec, kinds, device, dtype, args, res, flush)
            elif part == "generate":
                run_generate(gen_spec, kinds, device, dtype, args, res, flush)
            else:
                raise SystemExit(f"unknown part {part!r}")
        except Terminated as e:
            log(f"  {part}: {e}")
            res["error"] = str(e)
            flush()
            raise SystemExit(143) from None
        except Exception as e:
            log(f"  {part} failed: {type(e).__name__}: {e}")
            res["error"] = f"{type(e).__name__}: {e}"
        res["seconds"] = time.perf_counter() - t0
        log(f"  ({part} took {res['seconds']:.0f}s)")
        flush()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
