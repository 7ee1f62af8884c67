"""Requests/s of the Ray Serve deployment with 1 and 2 replicas, against the single-process server (baseline).

The same base and adapters as ``server_load.py`` (a random BERT, hidden 128 / 2 layers, MiniLM tokenizer; 4
adapters with 2..5 labels). Each setting gets ``--warmup`` s of traffic, then ``--duration`` s of ``--clients``
async httpx clients sending single-input ``/v1/predict`` requests, each naming a random adapter (mixed traffic).

* ``single``: ``bitfit-peft serve`` in a child process (uvicorn, dynamic batching), ``OMP_NUM_THREADS=1``.
* ``ray-N``: :func:`bitfit_peft.serving.ray_serve.build_app` with N replicas of 1 CPU and 1 torch thread each,
  on ``ray.init(num_cpus=N)``; ingress, registry, proxy and controller take no CPU reservation.

Usage::

    python benchmarks/ray_throughput.py [--duration 10] [--clients 32] [--replicas 1,2] \
        [--json benchmarks/results/cpu/ray_throughput.json [--append]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ensure_bitfit_importable, format_table, log, write_json  # noqa: E402
from server_load import free_port, make_adapters, make_base, percentile, run_traffic, start_server  # noqa: E402


def _wait_healthy(url: str, replicas: int, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/healthz", timeout=5)
            if resp.status_code == 200 and resp.json().get("replicas", 1) == replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy with {replicas} replicas")


def _measure(name: str, url: str, tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    run_traffic(url, tasks, args.warmup, args.clients, seed=1)
    out = run_traffic(url, tasks, args.duration, args.clients, seed=2)
    ok = len(out["latencies"])
    row = {"setting": name, "requests_per_s": ok / out["elapsed"], "p50_ms": percentile(out["latencies"], 50) * 1000,
           "p99_ms": percentile(out["latencies"], 99) * 1000, "statuses": out["statuses"], "errors": out["errors"]}
    log(f"{name}: {row['requests_per_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
        f"statuses {row['statuses']}")
    return row


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from bitfit_peft.serving.ray_serve import build_app

    tmp = Path(tempfile.mkdtemp(prefix="ray-throughput-"))
    base = make_base(tmp / "base", args.hidden, args.layers)
    root = tmp / "adapters"
    root.mkdir()
    make_adapters(base, root, args.adapters)
    tasks = [f"a{i:03d}" for i in range(args.adapters)]
    rows = []

    args.threads, args.max_queue = 1, 4096
    port = free_port()
    proc = start_server(base, root, port, args, tmp / "single.log")
    try:
        import httpx

        for t in tasks:
            httpx.post(f"http://127.0.0.1:{port}/v1/adapters", json={"name": t, "path": t}, timeout=60)
        rows.append(_measure("single process", f"http://127.0.0.1:{port}", tasks, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    for n in args.replicas:
        os.environ["RAY_DEDUP_LOGS"] = "0"
        ray.init(num_cpus=n, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        app = build_app(str(base), {t: str(root / t) for t in tasks}, task_type="SEQ_CLS", replicas=n,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.max_wait_ms / 1000,
                        device="cpu", dtype="float32", max_length=128, torch_threads=1,
                        ray_actor_options={"num_cpus": 1})
        serve.run(app, name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, n)
            rows.append(_measure(f"ray, {n} replica{'s' if n > 1 else ''}", url, tasks, args))
        finally:
            serve.shutdown()
            ray.shutdown()
    baseline = rows[0]["requests_per_s"]
    for row in rows:
        row["ratio_to_single"] = row["requests_per_s"] / baseline
    ray1 = next((r["requests_per_s"] for r in rows if r["setting"] == "ray, 1 replica"), None)
    for row in rows:
        row["ratio_to_ray1"] = row["requests_per_s"] / ray1 if ray1 else None
    return {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--append", action="store_true", help="add this run to the runs already in --json")
    args = parser.parse_args()
    if not ensure_bitfit_importable():
        raise SystemExit("bitfit_peft is not importable")
    result = benchmark(args)
    print(format_table(["setting", "req/s", "x single", "x ray-1", "p50 ms", "p99 ms"],
                       [[r["setting"], round(r["requests_per_s"], 1), round(r["ratio_to_single"], 2),
                         round(r["ratio_to_ray1"], 2) if r["ratio_to_ray1"] else "-", round(r["p50_ms"]),
                         round(r["p99_ms"])] for r in result["rows"]]))
    runs = []
    if args.append and args.json and Path(args.json).is_file():
        runs = json.loads(Path(args.json).read_text())["runs"]
    write_json(args.json, {"runs": [*runs, result]})


if __name__ == "__main__":
    main()
