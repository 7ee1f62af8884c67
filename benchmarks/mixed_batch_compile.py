"""``torch.compile`` stages of ``mixed_batch.py``'s forward part: compile, check against eager, count recompiles
and graph breaks (Dynamo's counters), time against the eager and the compiled base (see ``mixed_batch.py``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Flush, interleaved_timing, log, summarize, sync  # noqa: E402


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _dynamo_stats() -> dict[str, Any]:
    """Graph breaks (by reason), recompile-limit hits and graph count from ``torch._dynamo.utils.counters``."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for msg, n in counters["unimplemented"].items():
        lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
        ctx = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Developer debug context")), "")
        key = (lines[0] if lines else "?")[:80] + (f" [{ctx[:160]}]" if ctx else "")
        reasons[key] = reasons.get(key, 0) + int(n)
    limit_hits = sum(n for r, n in reasons.items() if "recompile limit" in r.lower())
    return {
        "frames_total": int(counters["frames"]["total"]),
        "frames_ok": int(counters["frames"]["ok"]),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": sum(reasons.values()) - limit_hits,
        "recompile_limit_hits": limit_hits,
        "break_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:8]),
    }


def run_compiled(
    models: dict[str, torch.nn.Module],
    base: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    names: list[str],
    device: torch.device,
    args: argparse.Namespace,
    res: dict[str, Any],
    flush: Flush,
) -> None:
    """``torch.compile`` stages: compile, check against eager, count recompiles, time vs eager ``base``.

    Stage ``single``: ``base_compiled`` and ``bitfit_single_compiled`` in a fresh Dynamo state (what a user who
    never mixes gets). Stage ``mixed``: the same compiled PEFT model is then also called with ``adapter_names``;
    ``bitfit_mixed_compiled`` and ``bitfit_single_compiled_after_mixed`` (single-adapter calls once mixed
    calls have been compiled too) are timed with ``base_compiled`` again. Ratios are within a stage.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    mode = args.compile_mode
    log(f"\n  -- torch.compile, mode {mode!r}")
    torch._dynamo.reset()
    counters.clear()
    info: dict[str, Any] = {
        "mode": mode,
        "recompile_limit": getattr(torch._dynamo.config, "recompile_limit", None),
        "patterns": {},
        "stages": {},
    }
    res["compile"] = info
    cbase = torch.compile(base, mode=mode)  # lazy: compiles on the first call
    fns: dict[str, Callable[[], Any]] = {"base_compiled": lambda: cbase(**inputs).logits}
    eager: dict[str, Callable[[], Any]] = {"base_compiled": lambda: base(**inputs).logits}
    if "bitfit" in models:
        pm = models["bitfit"]
        cpm = copy.deepcopy(pm)  # compiled in place (docs/serving.md), so keep the eager model separate
        cpm.get_base_model().compile(mode=mode)
        fns["bitfit_single_compiled"] = lambda: cpm(**inputs).logits
        fns["bitfit_mixed_compiled"] = lambda: cpm(**inputs, adapter_names=names).logits
        eager["bitfit_single_compiled"] = lambda: pm(**inputs).logits
        eager["bitfit_mixed_compiled"] = lambda: pm(**inputs, adapter_names=names).logits
    t_start = time.perf_counter()

    def fail(name: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        info["patterns"].setdefault(name, {})["error"] = msg[:2000]
        log(f"  {name} failed: {msg.splitlines()[0][:300]}")
        fns.pop(name, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def maxdiff(name: str) -> float:
        return (fns[name]().float() - eager[name]().float()).abs().max().item()

    def compile_first(name: str) -> None:
        """First call = compile (Dynamo + Inductor); then check it against eager."""
        if name not in fns:
            return
        if args.compile_budget is not None and time.perf_counter() - t_start > args.compile_budget:
            fail(name, RuntimeError(f"skipped: compile budget {args.compile_budget:.0f}s used up"))
            flush()
            return
        f0, t0 = _frames(), time.perf_counter()
        try:
            fns[name]()
            sync(device)
            entry = {"first_call_s": time.perf_counter() - t0, "frames_compiled": _frames() - f0}
            entry["maxdiff_vs_eager"] = maxdiff(name)
        except Exception as e:
            fail(name, e)
            flush()
            return
        info["patterns"][name] = entry
        log(f"  {name}: first call {entry['first_call_s']:.1f}s, {entry['frames_compiled']} frames compiled")
        flush()

    def stage(key: str, warm: list[str], timed_names: dict[str, str]) -> None:
        """Alternate ``warm`` (frames compiled now = recompiles), re-check outputs, then time ``timed_names``
        (pattern name -> fn name) interleaved with the eager base."""
        st: dict[str, Any] = {}
        info["stages"][key] = st
        warm = [n for n in warm if n in fns]
        f0, t0 = _frames(), time.perf_counter()
        for _ in range(args.compile_warmup):
            for name in warm:
                if name in fns:
                    try:
                        fns[name]()
                    except Exception as e:
                        fail(name, e)
        sync(device)
        st["warmup_s"] = time.perf_counter() - t0
        st["recompiles_warmup"] = _frames() - f0
        for name in [n for n in warm if n in fns]:  # a stale graph after switching would show up here
            try:
                d = maxdiff(name)
            except Exception as e:
                fail(name, e)
                continue
            info["patterns"][name][f"maxdiff_vs_eager_{key}"] = d
            check = res.setdefault("check", {})
            check[f"{name}_vs_eager_maxdiff"] = max(d, check.get(f"{name}_vs_eager_maxdiff", 0.0))
        st["dynamo"] = _dynamo_stats()
        summary = {k: v for k, v in st["dynamo"].items() if k != "break_reasons"}
        log(f"  [{key}] {st['recompiles_warmup']} recompiles in {args.compile_warmup} alternating rounds, {summary}")
        for r, n in st["dynamo"]["break_reasons"].items():
            log(f"    {n:3d}x {r}")
        flush()
        todo = {pat: fns[fn] for pat, fn in timed_names.items() if fn in fns}
        if not todo:
            return
        errors: dict[str, str] = {}

        def merge(summary: dict[str, Any]) -> None:
            for name, entry in summary.items():
                if name == "base":
                    st["base_ms"] = entry["ms"]
                elif name == "base_compiled" and key != "single" and "base_compiled" in res["patterns"]:
                    st["base_compiled_ms"] = entry["ms"]  # keep the first stage's row in the table
                else:
                    entry["stage"] = key
                    res["patterns"][name] = entry
            flush()

        f0 = _frames()
        log(f"  [{key}] timing eager base + {', '.join(todo)}")
        times = interleaved_timing(
            {"base": eager["base_compiled"], **todo},
            device,
            args.rounds,
            args.iters,
            1,
            args.budget,
            2,
            errors,
            lambda t: merge(summarize(t, 1e3, "ms", ref2="base_compiled", quiet=True)),
        )
        st["recompiles_timed"] = _frames() - f0
        for name, msg in errors.items():
            info["patterns"].setdefault(name, {})["error"] = msg[:2000]
        merge(summarize(times, 1e3, "ms", ref2="base_compiled"))
        log(f"  [{key}] recompiles while timing: {st['recompiles_timed']}")

    compile_first("base_compiled")
    compile_first("bitfit_single_compiled")
    stage(
        "single",
        ["base_compiled", "bitfit_single_compiled"],
        {"base_compiled": "base_compiled", "bitfit_single_compiled": "bitfit_single_compiled"},
    )
    if "bitfit_mixed_compiled" in fns:
        compile_first("bitfit_mixed_compiled")
        stage(
            "mixed",
            ["bitfit_single_compiled", "bitfit_mixed_compiled"],
            {
                "base_compiled": "base_compiled",
                "bitfit_mixed_compiled": "bitfit_mixed_compiled",
                "bitfit_single_compiled_after_mixed": "bitfit_single_compiled",
            },
        )
    info["compile_stage_s"] = time.perf_counter() - t_start
    info["dynamo"] = _dynamo_stats()
    flush()
