"""How long one batch holds the serving engine, and the longest stretch in it that no other request can use.

The worst batches the default limits allow (``bitfit_peft.serving.limits.Limits``): on the packaged MiniLM-L6, one
512-token input (a text pair at the schema's character limit: ``max_batch_tokens`` 512 admits one) and 32 short
inputs; on the load test's 2-layer GPT-2, the costliest generation one request may ask for (1 prompt x 4 beams x 4
sequences x 512 new tokens). *hold*: the whole call; *longest stretch*: the longest time between two points where
cheaper waiting requests may run (``interleave.py``: before each transformer block, so at every decoding step),
counting from the call's start and to its end: what a short request waits for at most before its turn. Median of
``--repeat`` runs, 1 torch thread::

    PYTHONPATH=src python benchmarks/engine_hold.py   # -> benchmarks/results/engine_hold.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
LONG = "lorem ipsum dolor sit amet " * 740  # 19,980 characters: the schema's limit is 20,000


def _measure(call: Any, repeat: int) -> dict[str, float]:
    from bitfit_peft.serving.interleave import step_hook

    holds, longest, typical = [], [], []
    for _ in range(repeat):
        stamps: list[float] = []
        started = time.perf_counter()
        with step_hook(lambda _set_aside, stamps=stamps: stamps.append(time.perf_counter())):
            call()
        ended = time.perf_counter()
        points = [started, *stamps, ended]
        gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
        holds.append(ended - started)
        longest.append(max(gaps))
        typical.append(statistics.median(gaps))
    return {"hold_s": round(statistics.median(holds), 4), "longest_stretch_s": round(statistics.median(longest), 4),
            "median_stretch_s": round(statistics.median(typical), 4), "boundaries": len(stamps)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tenant_load"), help="tenant_load.py's fixtures")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import tenant_load

    from bitfit_peft.serving import MultiTaskEngine

    torch.set_num_threads(1)
    if not (args.dir / "gpt2").exists():
        tenant_load.build(args.dir)
    predict = MultiTaskEngine(tenant_load._minilm(), task_type="SEQ_CLS", device="cpu")
    predict.add_adapter("g0", args.dir / "root" / "g0")
    generate = MultiTaskEngine(str(args.dir / "gpt2"), task_type="CAUSAL_LM", device="cpu")
    generate.add_adapter("gen", args.dir / "groot" / "gen")
    cases = {
        "MiniLM predict: one 512-token pair": lambda: predict.predict([("g0", (LONG, LONG))]),
        "MiniLM predict: 32 short inputs": lambda: predict.predict([("g0", f"a short review {i}") for i in range(32)]),
        "GPT-2 generate: 1 x 4 beams x 4 sequences x 512 tokens": lambda: generate.generate(
            [("gen", LONG[:1200])], max_new_tokens=512, num_beams=4, num_return_sequences=4),
        "GPT-2 generate: 16 short prompts x 8 tokens": lambda: generate.generate(
            [("gen", f"hello number {i}") for i in range(16)], max_new_tokens=8),
    }
    rows = []
    for name, call in cases.items():
        call()  # warm-up
        row = {"case": name, **_measure(call, args.repeat)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "engine_hold.json"
    out.write_text(json.dumps({"repeat": args.repeat, "torch_threads": 1, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
