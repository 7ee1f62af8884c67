"""What the OpenAI-compatible layer costs, and the multi-tenancy tax, over HTTP.

Two real ``bitfit-peft serve`` servers in child processes (1 torch thread each, loopback): a ``SEQ_CLS`` random
BERT and a ``CAUSAL_LM`` random GPT-2 (hidden 128, 2 layers, the MiniLM tokenizer), 8 BitFit adapters each.
``--clients`` async httpx clients send single-input requests for ``--duration`` seconds per run; the variants of
a comparison alternate in ``--rounds`` rounds (A B, then B A, ...) so that drift in the shared machine's load hits
both; ``vs_first`` is the median over rounds of the round's requests/s ratio.

Comparisons (the same work on both sides):

- ``POST /classify`` (vLLM shape) against ``POST /v1/predict``, one text, a random adapter;
- ``POST /v1/completions`` (greedy, ``max_tokens`` = 8) against ``POST /v1/generate`` (``max_new_tokens`` = 8);
- the multi-tenancy tax: ``/classify`` and ``/v1/completions`` requests each naming a random one of the 8 adapters
  against the same requests all naming one adapter.

Usage::

    python benchmarks/openai_overhead.py [--duration 3] [--rounds 4] [--clients 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import REPO_ROOT, ensure_bitfit_importable, format_table, log, write_json  # noqa: E402
from server_load import SENTENCES, cpu_seconds, free_port, make_adapters, make_base, percentile  # noqa: E402

ADAPTERS = [f"a{i:03d}" for i in range(8)]
NEW_TOKENS = 8


def make_lm(out: Path, tokenizer_dir: Path, hidden: int, layers: int) -> Path:
    """A random GPT-2 (``hidden`` / ``layers``) with ``tokenizer_dir``'s tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64),
                     n_positions=256, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_lm_adapters(base: Path, root: Path, names: list[str]) -> None:
    """BitFit ``CAUSAL_LM`` adapters with random deltas as ``root/<name>``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from bitfit_peft import BitFitConfig

    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), BitFitConfig(task_type="CAUSAL_LM"))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "bitfit_delta" in pname:
                    param.normal_(0.0, 0.05)
        model.save_pretrained(root / name)


def start(base: Path, root: Path, task_type: str, log_file: Path) -> tuple[subprocess.Popen, str]:
    """``bitfit-peft serve`` with every adapter of ``root`` loaded; waits for ``/healthz``."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bitfit_peft.cli", "serve", "--base", str(base), "--task-type", task_type,
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--max-batch-size", "32", "--max-wait-ms", "5", "--max-length", "128", "--log-level", "warning"]
    for name in ADAPTERS:
        cmd += ["--adapter", f"{name}={root / name}"]
    proc = subprocess.Popen(cmd, env=env, stdout=log_file.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def body(variant: str, task: str, text: str) -> tuple[str, dict[str, Any]]:
    if variant == "predict":
        return "/v1/predict", {"task": task, "text": text}
    if variant == "classify":
        return "/classify", {"model": task, "input": text}
    if variant == "generate":
        return "/v1/generate", {"task": task, "prompt": text, "max_new_tokens": NEW_TOKENS}
    return "/v1/completions", {"model": task, "prompt": text, "max_tokens": NEW_TOKENS, "temperature": 0}


async def _traffic(url: str, variant: str, tasks: list[str], duration: float, clients: int,
                   seed: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        end = time.monotonic() + duration

        async def one_client() -> None:
            while time.monotonic() < end:
                path, payload = body(variant, rng.choice(tasks), rng.choice(SENTENCES))
                started = time.perf_counter()
                resp = await client.post(path, json=payload)
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.monotonic() - started
    if failures:
        raise SystemExit(f"{variant}: {len(failures)} failed requests, e.g. {failures[0]}")
    return {"latencies": latencies, "elapsed": elapsed}


def compare(url: str, pid: int, runs: list[tuple[str, str, list[str]]], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """``runs``: (label, variant, tasks); alternated over ``args.rounds`` rounds after a short warm-up each. Also
    the server process's CPU seconds per request (less sensitive to other jobs on the machine than requests/s)."""
    for _, variant, tasks in runs:
        asyncio.run(_traffic(url, variant, tasks, 1.0, args.clients, seed=0))
    totals: dict[str, dict[str, Any]] = {label: {"latencies": [], "requests": 0, "seconds": 0.0, "rps": [], "cpu": 0.0}
                                         for label, _, _ in runs}
    for r in range(args.rounds):
        for label, variant, tasks in (runs if r % 2 == 0 else runs[::-1]):
            cpu = cpu_seconds(pid)
            out = asyncio.run(_traffic(url, variant, tasks, args.duration, args.clients, seed=r + 1))
            total = totals[label]
            total["cpu"] += cpu_seconds(pid) - cpu
            total["latencies"] += out["latencies"]
            total["requests"] += len(out["latencies"])
            total["seconds"] += out["elapsed"]
            total["rps"].append(len(out["latencies"]) / out["elapsed"])
            log(f"  round {r + 1} {label}: {total['rps'][-1]:.1f} req/s")
    rows = []
    for label, _, _ in runs:
        total = totals[label]
        lat = total["latencies"]
        rows.append({"setting": label, "requests": total["requests"],
                     "req_per_s": round(total["requests"] / total["seconds"], 2),
                     "req_per_s_rounds": [round(x, 2) for x in total["rps"]],
                     "p50_ms": round(1000 * percentile(lat, 50), 2), "p99_ms": round(1000 * percentile(lat, 99), 2),
                     "server_cpu_ms_per_req": round(1000 * total["cpu"] / max(total["requests"], 1), 3)})
    first = totals[runs[0][0]]["rps"]
    for row, (label, _, _) in zip(rows, runs, strict=True):  # paired by round: drift hits both sides of a pair
        ratios = [x / y for x, y in zip(totals[label]["rps"], first, strict=True)]
        row["vs_first_rounds"] = [round(x, 3) for x in ratios]
        row["vs_first"] = round(statistics.median(ratios), 3)
        row["cpu_vs_first"] = round(row["server_cpu_ms_per_req"] / rows[0]["server_cpu_ms_per_req"], 3)
    return rows


def pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "n/a"


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from server_load import default_tokenizer_dir

    work = Path(tempfile.mkdtemp(prefix="bitfit-openai-overhead-"))
    procs: list[subprocess.Popen] = []
    try:
        cls_base = make_base(work / "bert", args.hidden, args.layers)
        (work / "cls").mkdir()
        make_adapters(cls_base, work / "cls", len(ADAPTERS))
        lm_base = make_lm(work / "gpt2", default_tokenizer_dir(), args.hidden, args.layers)
        make_lm_adapters(lm_base, work / "lm", ADAPTERS)
        one = [ADAPTERS[0]]
        results: dict[str, Any] = {"pressure_before": pressure()}
        proc, url = start(cls_base, work / "cls", "SEQ_CLS", work / "cls.log")
        procs.append(proc)
        log("classification: /v1/predict vs /classify (random adapter of 8)")
        results["classify_vs_predict"] = compare(url, proc.pid, [("/v1/predict", "predict", ADAPTERS),
                                                       ("/classify", "classify", ADAPTERS)], args)
        log("classification: /classify, 8 adapters mixed vs all one adapter")
        results["classify_tenancy"] = compare(url, proc.pid, [("/classify, one adapter", "classify", one),
                                                    ("/classify, 8 adapters mixed", "classify", ADAPTERS)], args)
        proc.terminate()
        proc, url = start(lm_base, work / "lm", "CAUSAL_LM", work / "lm.log")
        procs.append(proc)
        log("generation: /v1/generate vs /v1/completions (random adapter of 8)")
        results["completions_vs_generate"] = compare(url, proc.pid, [("/v1/generate", "generate", ADAPTERS),
                                                           ("/v1/completions", "completions", ADAPTERS)], args)
        log("generation: /v1/completions, 8 adapters mixed vs all one adapter")
        results["completions_tenancy"] = compare(url, proc.pid, [("/v1/completions, one adapter", "completions", one),
                                                       ("/v1/completions, 8 adapters mixed", "completions",
                                                        ADAPTERS)], args)
        results["pressure_after"] = pressure()
        return results
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks/results/cpu/openai_overhead.json")
    args = parser.parse_args()
    if not ensure_bitfit_importable():
        raise SystemExit("bitfit_peft is not importable")
    results = benchmark(args)
    for key in ("classify_vs_predict", "classify_tenancy", "completions_vs_generate", "completions_tenancy"):
        log(f"\n{key}")
        cols = ["setting", "requests", "req_per_s", "vs_first", "p50_ms", "p99_ms", "server_cpu_ms_per_req",
                "cpu_vs_first"]
        log(format_table(cols, [[row[c] for c in cols] for row in results[key]]))
    write_json(args.json, {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
