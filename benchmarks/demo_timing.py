"""How long the built-in demo takes: ``bitfit-peft train`` with no arguments, timed end to end.

The README quotes this figure. The script runs the real command (the packaged MiniLM-L6 on the packaged SMS
Spam demo data) ``--runs`` times, each in a fresh empty working directory under a temporary directory, so each
run saves a new ``./bitfit-demo-adapter`` and nothing is reused. It records per run:

* ``wall_s``: wall time of the whole command, from process start to exit, as a user sees it (interpreter
  start-up, imports, model and data loading, training, evaluation, saving);
* ``reported_wall_s`` / ``reported_train_s``: the wall and training time the command itself prints;
* ``accuracy_before`` / ``accuracy_after`` / ``majority_accuracy``: the dev accuracies the command reports
  (read from the ``bitfit_training.json`` it writes, checked against the printed table);

plus the machine (CPU model, cores, load average and CPU pressure around the runs) and library versions.

Usage::

    python benchmarks/demo_timing.py                                             # one run, print the summary
    python benchmarks/demo_timing.py --runs 3 --json benchmarks/results/cpu/demo_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import env_info, log, write_json

SUMMARY_FILE = "bitfit_training.json"
ADAPTER_DIR = "bitfit-demo-adapter"


def demo_command() -> list[str]:
    """The ``bitfit-peft`` console script of this interpreter's environment, with the ``train`` sub-command."""
    exe = Path(sys.executable).parent / "bitfit-peft"
    found = str(exe) if exe.exists() else shutil.which("bitfit-peft")
    if found is None:
        raise SystemExit("bitfit-peft is not installed in this environment (pip install -e .)")
    return [found, "train"]


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_pressure() -> str | None:
    """The ``some`` line of ``/proc/pressure/cpu`` (share of time some task waited for a CPU), if available."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _table_value(stdout: str, label: str) -> str | None:
    """The value cell of a row of the command's result table (rich draws ``│ label │ value │``)."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)]
        cells = [c for c in cells if c]
        if len(cells) >= 2 and cells[0] == label:
            return cells[1]
    return None


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.search(r"[-+]?\d+(?:\.\d+)?", text)
    return float(m.group()) if m else None


def run_once(cmd: list[str], timeout: float) -> dict[str, Any]:
    """One run of the demo in a fresh working directory; raises if the command fails."""
    with tempfile.TemporaryDirectory(prefix="bitfit-demo-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                f"--- stderr\n{proc.stderr[-4000:]}"
            )
        out_dir = Path(tmp) / ADAPTER_DIR
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
        saved = sorted(p.name for p in out_dir.iterdir())
    result = summary.get("result", {})
    printed_after = _float(_table_value(proc.stdout, "accuracy after"))
    printed_wall = _table_value(proc.stdout, "wall time")
    run = {
        "wall_s": round(wall, 2),
        "reported_wall_s": round(result["wall_time_s"], 2) if "wall_time_s" in result else _float(printed_wall),
        "reported_train_s": round(result["train_time_s"], 2) if "train_time_s" in result else None,
        "accuracy_before": result.get("accuracy_before"),
        "accuracy_after": result.get("accuracy_after", printed_after),
        "accuracy_after_printed": printed_after,
        "majority_accuracy": _float(_table_value(proc.stdout, "majority-class accuracy")),
        "examples_train_dev": _table_value(proc.stdout, "examples (train / dev)"),
        "epochs_run": _float(_table_value(proc.stdout, "epochs run")),
        "adapter_file_size": _table_value(proc.stdout, "adapter file size"),
        "saved_files": saved,
    }
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="how many times to run the demo (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run")
    ap.add_argument("--json", default=None, help="write the results (JSON) here")
    args = ap.parse_args(argv)

    cmd = demo_command()
    env = env_info(torch.device("cpu"))
    env.update(
        {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "sched_affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
        }
    )
    env.pop("threads", None)  # this process's torch threads; the demo process picks its own
    log(f"demo command: bitfit-peft train ({cmd[0]}), {args.runs} run(s)")
    runs = []
    load_before, pressure_before = load_average(), cpu_pressure()
    for i in range(args.runs):
        run = run_once(cmd, args.timeout)
        runs.append(run)
        log(
            f"  run {i + 1}: {run['wall_s']:.1f} s wall (command reports {run['reported_wall_s']} s, training "
            f"{run['reported_train_s']} s), accuracy {run['accuracy_before']} -> {run['accuracy_after']}"
        )
    walls = [r["wall_s"] for r in runs]
    accs = [r["accuracy_after"] for r in runs if r["accuracy_after"] is not None]
    summary = {
        "runs": len(runs),
        "wall_s_median": round(statistics.median(walls), 2),
        "wall_s_min": min(walls),
        "wall_s_max": max(walls),
        "accuracy_after_median": statistics.median(accs) if accs else None,
        "accuracy_after_min": min(accs) if accs else None,
        "accuracy_after_max": max(accs) if accs else None,
    }
    payload = {
        "benchmark": "demo_timing",
        "command": "bitfit-peft train",
        "env": env,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpu_pressure_before": pressure_before,
        "cpu_pressure_after": cpu_pressure(),
        "summary": summary,
        "results": runs,
    }
    log(json.dumps(summary, indent=2))
    write_json(args.json, payload)
    if args.json:
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
