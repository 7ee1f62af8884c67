"""Serving latency while adapters are hot-loaded: predict p50/p99 with and without concurrent loads.

One :class:`~bitfit_peft.serving.MultiTaskEngine` (packaged MiniLM, CPU fp32) with ``--resident`` adapters. A
client thread sends one-text ``predict`` calls back to back for ``--duration`` seconds, first alone (baseline),
then while a second thread hot-loads adapters without pause (cycling through ``--loads`` folders, unloading the
oldest). A load that held the engine lock
while it reads and checks files would stall every predict for the whole load; the report gives p50/p99 of both
phases and their ratio.

Usage::

    python benchmarks/predict_during_loads.py [--resident 100] [--loads 200] [--duration 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ensure_bitfit_importable, log, write_json  # noqa: E402
from server_load import SENTENCES, default_tokenizer_dir, make_adapters  # noqa: E402


def _stats(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def _client(engine: Any, names: list[str], seconds: float, rng: random.Random) -> list[float]:
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        engine.predict([(rng.choice(names), rng.choice(SENTENCES))])
        latencies.append(time.perf_counter() - started)
    return latencies


def run(resident: int, loads: int, duration: float, seed: int) -> dict[str, Any]:
    import torch

    from bitfit_peft.serving import MultiTaskEngine

    torch.set_num_threads(1)
    rng = random.Random(seed)
    base = default_tokenizer_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        make_adapters(base, root, resident + loads, seed=seed)
        dirs = sorted(p for p in root.iterdir() if p.name.startswith("a"))
        engine = MultiTaskEngine(str(base), task_type="SEQ_CLS", device="cpu", dtype="float32", max_length=64)
        for i, d in enumerate(dirs[:resident]):
            engine.add_adapter(f"r{i}", d)
        names = engine.tasks()
        baseline = _stats(_client(engine, names, duration, rng))
        load_times: list[float] = []
        stop = threading.Event()

        def loader() -> None:  # loads without pause until the client stops (unloading the oldest beyond --loads)
            fresh = dirs[resident:]
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                engine.add_adapter(f"n{i}", fresh[i % len(fresh)])
                load_times.append(time.perf_counter() - started)
                if i >= len(fresh) - 1:
                    engine.remove_adapter(f"n{i - len(fresh) + 1}")
                i += 1

        thread = threading.Thread(target=loader)
        thread.start()
        during = _stats(_client(engine, names, duration, rng))
        stop.set()
        thread.join()
    result = {"resident": resident, "loads_done": len(load_times),
              "load_ms_median": 1000 * statistics.median(load_times) if load_times else None,
              "predict_alone": baseline, "predict_during_loads": during,
              "p99_ratio": during["p99_ms"] / baseline["p99_ms"]}
    log(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resident", type=int, default=100)
    parser.add_argument("--loads", type=int, default=200)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_bitfit_importable()
    result = run(args.resident, args.loads, args.duration, args.seed)
    print(result)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
