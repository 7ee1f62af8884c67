"""Many resident adapters on one base: hot load time, memory per adapter and mixed-batch latency vs resident count.

One :class:`~bitfit_peft.serving.MultiTaskEngine` on the packaged MiniLM (CPU, fp32). Adapters (random deltas and
2..5-label heads, written by :func:`server_load.make_adapters`) are hot-loaded one after another; at each checkpoint
(``--counts``, default 10 / 100 / 1,000 / 10,000 resident) it records

- **hot load**: median (and p90) ``add_adapter`` time of ``--window`` more adapters loaded at the checkpoint (each
  unloaded again, so the resident count stays the checkpoint's);
- **memory per adapter**: growth of the live process RSS (after GC and ``malloc_trim``) since the first checkpoint,
  divided by the adapters loaded since, against the engine's own tensor bytes per adapter (deltas + head);
- **mixed batch**: median ``predict`` time of a batch of 16 texts, each of a random resident task.

Ratios are to the first checkpoint (target: hot load and mixed batch within 1.5x, memory within 1.5x of the
tensor bytes). Usage::

    python benchmarks/resident_adapters.py [--counts 10,100,1000,10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ensure_bitfit_importable, format_table, log, write_json  # noqa: E402
from server_load import SENTENCES, default_tokenizer_dir, make_adapters, rss_bytes  # noqa: E402


def _live_rss() -> int:
    """Process RSS after a GC and returning freed heap pages to the OS (glibc), so it counts live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return rss_bytes(os.getpid())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(counts: list[int], window: int, batches: int, seed: int) -> dict[str, Any]:
    import torch

    from bitfit_peft.serving import MultiTaskEngine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rng = random.Random(seed)
    base = default_tokenizer_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        log(f"writing {max(counts)} adapters ...")
        made = make_adapters(base, root, max(counts) + window, seed=seed)
        dirs = sorted(p for p in root.iterdir() if p.name.startswith("a"))
        engine = MultiTaskEngine(str(base), task_type="SEQ_CLS", device="cpu", dtype="float32", max_length=64)
        engine.add_adapter("t0", dirs[0])
        engine.predict([("t0", SENTENCES[0])])
        loaded, first = 1, None
        rows = []
        for count in counts:
            while loaded < count:
                engine.add_adapter(f"t{loaded}", dirs[loaded])
                loaded += 1
            times = []  # hot loads AT this resident count: load --window more, each unloaded again
            for extra in dirs[-window:]:
                started = time.perf_counter()
                engine.add_adapter("probe", extra)
                times.append(time.perf_counter() - started)
                engine.remove_adapter("probe")
            names = engine.tasks()
            latencies = []
            for _ in range(batches):
                batch = [(rng.choice(names), rng.choice(SENTENCES)) for _ in range(16)]
                started = time.perf_counter()
                engine.predict(batch)
                latencies.append(time.perf_counter() - started)
            info = engine.adapters()
            tensor_bytes = statistics.mean(i.total_bytes for i in info)
            rss = _live_rss()
            if first is None:  # memory per adapter: growth since the first checkpoint
                first = (loaded, rss)
            rss_per = (rss - first[1]) / (loaded - first[0]) if loaded > first[0] else float("nan")
            recent = times
            rows.append({
                "resident": loaded,
                "hot_load_ms_median": 1000 * statistics.median(recent),
                "hot_load_ms_p90": 1000 * _percentile(recent, 0.9),
                "mixed16_ms_median": 1000 * statistics.median(latencies),
                "mixed16_ms_p90": 1000 * _percentile(latencies, 0.9),
                "rss_per_adapter_kib": rss_per / 1024,
                "tensor_bytes_per_adapter_kib": tensor_bytes / 1024,
            })
            log(f"{loaded} resident: {rows[-1]}")
        del engine
        lru = lru_latency(base, root, dirs, capacity=min(100, max(counts) // 2), trials=30, rng=rng)
        log(f"max_resident: {lru}")
    first = rows[0]
    for row in rows:
        row["hot_load_ratio"] = row["hot_load_ms_median"] / first["hot_load_ms_median"]
        row["mixed16_ratio"] = row["mixed16_ms_median"] / first["mixed16_ms_median"]
        row["memory_ratio_to_tensors"] = row["rss_per_adapter_kib"] / row["tensor_bytes_per_adapter_kib"]
    # ratios are to the first checkpoint, except memory, whose first figure is the growth to the second
    return {"model": "all-MiniLM-L6-v2 (packaged), SEQ_CLS, CPU fp32", "window": window, "batches": batches,
            "adapter_write_s": made, "rows": rows, "max_resident": lru}


def lru_latency(base: Path, root: Path, dirs: list[Path], capacity: int, trials: int, rng: random.Random) -> dict:
    """``max_resident=capacity`` with every adapter in ``root``: one-text predict of a resident task (hit) vs of a
    task not in memory (miss: loaded from the root on first request, the least recently used one evicted)."""
    from bitfit_peft.serving import MultiTaskEngine

    engine = MultiTaskEngine(str(base), task_type="SEQ_CLS", device="cpu", dtype="float32", max_length=64,
                             max_resident=capacity, adapter_roots=[root])
    names = [d.name for d in dirs]
    for name in names[:capacity]:
        engine.predict([(name, SENTENCES[0])])
    hits, misses = [], []
    for _ in range(trials):
        resident = rng.choice(engine.tasks())
        started = time.perf_counter()
        engine.predict([(resident, rng.choice(SENTENCES))])
        hits.append(time.perf_counter() - started)
        absent = rng.choice([n for n in names if engine.registry.get(n) is None])
        started = time.perf_counter()
        engine.predict([(absent, rng.choice(SENTENCES))])
        misses.append(time.perf_counter() - started)
    assert len(engine.tasks()) == capacity
    return {"capacity": capacity, "known": len(names), "hit_ms_median": 1000 * statistics.median(hits),
            "miss_ms_median": 1000 * statistics.median(misses), "miss_ms_p90": 1000 * _percentile(misses, 0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10,100,1000,10000")
    parser.add_argument("--window", type=int, default=20, help="hot loads timed before each checkpoint")
    parser.add_argument("--batches", type=int, default=20, help="mixed batches timed at each checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_bitfit_importable()
    counts = sorted(int(c) for c in args.counts.split(","))
    result = run(counts, args.window, args.batches, args.seed)
    cols = ["resident", "hot_load_ms_median", "hot_load_ratio", "mixed16_ms_median", "mixed16_ratio",
            "rss_per_adapter_kib", "tensor_bytes_per_adapter_kib", "memory_ratio_to_tensors"]
    print(format_table(cols, [[row[c] for c in cols] for row in result["rows"]]))
    print("max_resident:", result["max_resident"])
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
