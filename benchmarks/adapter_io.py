"""Adapter I/O: load time, switch time and on-disk size of a BERT-base BitFit adapter (vs LoRA r8).

Measured (median over repeats, adapter files on local disk / page cache, model on the benchmark device):

* ``load_adapter``   ``PeftModel.load_adapter(dir, adapter_name=new)`` into a PeftModel holding 1 adapter
  (target < 20 ms); also with ``--resident`` (16) adapters already loaded
* ``from_pretrained``  ``PeftModel.from_pretrained(fresh_base, dir)`` (layer injection included)
* ``set_adapter``    switching the active adapter between two loaded ones (target < 1 ms), synced on CUDA;
  also with ``--resident`` adapters loaded
* file size of ``adapter_model.safetensors`` for fp32 and (BitFit) ``save_dtype`` bf16/fp16

LoRA r8 (all linear) is measured the same way in the same run and reported as the ratio baseline.

Usage::

    python benchmarks/adapter_io.py [--gpu] [--json out/adapter_io.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    GPU_BERT_BASE,
    ModelSpec,
    build_model,
    ensure_bitfit_importable,
    env_info,
    format_table,
    log,
    median,
    pick_device,
    sync,
    write_json,
)

TARGET_LOAD_MS = 20.0
TARGET_SWITCH_MS = 1.0


def make_config(kind: str, spec: ModelSpec, save_dtype: str = "float32") -> Any:
    """Adapter config for ``kind`` (bitfit | lora)."""
    if kind == "bitfit":
        from bitfit_peft import BitFitConfig

        return BitFitConfig(task_type=spec.task_type, save_dtype=save_dtype)
    from peft import LoraConfig

    return LoraConfig(
        task_type=spec.task_type, r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False
    )


def save_adapter(kind: str, base: torch.nn.Module, spec: ModelSpec, out_dir: Path, save_dtype: str) -> Path:
    """Create a randomly initialised adapter on a copy of ``base`` and save it; return its directory."""
    from peft import get_peft_model

    pm = get_peft_model(copy.deepcopy(base), make_config(kind, spec, save_dtype))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "bitfit_delta" in n:
                p.normal_(0.0, 0.02)
    path = out_dir / f"{kind}_{save_dtype}"
    pm.save_pretrained(str(path))
    del pm
    return path


def time_each(fn: Callable[[int], Any], n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` calls ``fn(i)`` (device synced around each)."""
    out = []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bench_kind(
    kind: str,
    base: torch.nn.Module,
    spec: ModelSpec,
    paths: dict[str, Path],
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Load / from_pretrained / switch timings for one adapter kind."""
    from peft import PeftModel

    res: dict[str, Any] = {}
    path = str(paths["float32"])
    sizes = {dt: (p / "adapter_model.safetensors").stat().st_size for dt, p in paths.items()}
    res["file_bytes"] = sizes

    # from_pretrained onto a fresh base copy (copy made outside the timed region).
    fp_times = []
    for _ in range(args.fp_repeats):
        fresh = copy.deepcopy(base)
        sync(device)
        t0 = time.perf_counter()
        loaded = PeftModel.from_pretrained(fresh, path, adapter_name="a0")
        sync(device)
        fp_times.append(time.perf_counter() - t0)
        del loaded, fresh
    res["from_pretrained_ms"] = median(fp_times) * 1e3

    host: Any = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="a0")
    host.eval()
    # Warm the file cache and code paths once.
    host.load_adapter(path, adapter_name="warm")
    host.delete_adapter("warm")

    def load_then_drop(i: int, n_resident: int) -> float:
        """Seconds to load one more adapter into a host holding ``n_resident`` adapters (delete untimed)."""
        sync(device)
        t0 = time.perf_counter()
        host.load_adapter(path, adapter_name=f"l{n_resident}_{i}")
        sync(device)
        dt = time.perf_counter() - t0
        host.delete_adapter(f"l{n_resident}_{i}")
        return dt

    load_times = [load_then_drop(i, 1) for i in range(args.load_repeats)]
    res["load_adapter_ms"] = median(load_times) * 1e3
    res["load_adapter_ms_all"] = [t * 1e3 for t in load_times]
    # Serving scenario: the same load with many adapters already resident (PEFT bookkeeping grows with it).
    for i in range(1, args.resident):
        host.load_adapter(path, adapter_name=f"r{i}")
    many = [load_then_drop(i, args.resident) for i in range(max(3, args.load_repeats // 3))]
    res["load_adapter_ms_many"] = median(many) * 1e3
    res["resident"] = args.resident
    many_names = ("a0", "r1")
    switch_many = time_each(lambda i: host.set_adapter(many_names[i % 2]), args.switch_repeats // 2, device)
    res["set_adapter_ms_many"] = median(switch_many) * 1e3
    for i in range(1, args.resident):
        host.delete_adapter(f"r{i}")

    host.load_adapter(path, adapter_name="a1")
    for name in ("a0", "a1"):  # warm both
        host.set_adapter(name)
    names = ("a0", "a1")
    switch_times = time_each(lambda i: host.set_adapter(names[i % 2]), args.switch_repeats, device)
    res["set_adapter_ms"] = median(switch_times) * 1e3
    res["set_adapter_ms_p90"] = sorted(switch_times)[int(0.9 * len(switch_times))] * 1e3
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="model on CUDA")
    ap.add_argument("--kinds", default="bitfit,lora")
    ap.add_argument("--load-repeats", type=int, default=15)
    ap.add_argument("--fp-repeats", type=int, default=5)
    ap.add_argument("--resident", type=int, default=16, help="adapters resident for the scaling measurement")
    ap.add_argument("--switch-repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.gpu)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "bitfit" in kinds and not ensure_bitfit_importable():
        log("bitfit_peft not importable: skipping bitfit")
        kinds.remove("bitfit")
    spec = replace(GPU_BERT_BASE, batch=1)
    payload: dict[str, Any] = {
        "benchmark": "adapter_io",
        "env": env_info(device),
        "spec": asdict(spec),
        "targets_ms": {"load_adapter": TARGET_LOAD_MS, "set_adapter": TARGET_SWITCH_MS},
        "results": {},
    }
    log(f"device: {payload['env']['device']} | torch {torch.__version__} | {spec.name} | kinds {kinds}")
    base = build_model(spec, device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            t0 = time.perf_counter()
            try:
                dtypes = ["float32", "bfloat16", "float16"] if kind == "bitfit" else ["float32"]
                paths = {dt: save_adapter(kind, base, spec, Path(tmp), dt) for dt in dtypes}
                payload["results"][kind] = bench_kind(kind, base, spec, paths, device, args)
            except Exception as e:
                log(f"  {kind} failed: {type(e).__name__}: {e}")
                payload["results"][kind] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  {kind} done in {time.perf_counter() - t0:.1f}s")
            write_json(args.json, payload)

    res = payload["results"]
    ref = res.get("lora", {})
    rows = []
    for kind, r in res.items():
        if "error" in r:
            rows.append([kind, r["error"][:60], None, None, None, None, None, None, None])
            continue
        fb = r["file_bytes"]
        for key in (
            "load_adapter_ms",
            "load_adapter_ms_many",
            "from_pretrained_ms",
            "set_adapter_ms",
            "set_adapter_ms_many",
        ):
            if key in ref and ref[key]:
                r[key.replace("_ms", "_ratio_to_lora")] = r[key] / ref[key]
        rows.append(
            [
                kind,
                r["load_adapter_ms"],
                r["load_adapter_ms_many"],
                r["from_pretrained_ms"],
                r["set_adapter_ms"],
                r["set_adapter_ms_many"],
                fb["float32"] / 1024,
                fb.get("bfloat16", float("nan")) / 1024,
                fb["float32"] / ref["file_bytes"]["float32"] if ref else None,
            ]
        )
    log(
        format_table(
            [
                "adapter",
                "load ms",
                f"load ms ({args.resident} res.)",
                "from_pretrained ms",
                "switch ms",
                f"switch ms ({args.resident} res.)",
                "fp32 KiB",
                "bf16 KiB",
                "size x lora",
            ],
            rows,
        )
    )
    if "bitfit" in res and "error" not in res["bitfit"]:
        b = res["bitfit"]
        b["meets_load_target"] = b["load_adapter_ms"] < TARGET_LOAD_MS
        b["meets_switch_target"] = b["set_adapter_ms"] < TARGET_SWITCH_MS
        log(
            f"targets: load < {TARGET_LOAD_MS} ms: {b['meets_load_target']}; "
            f"switch < {TARGET_SWITCH_MS} ms: {b['meets_switch_target']}"
        )
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
