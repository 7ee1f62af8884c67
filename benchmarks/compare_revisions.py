"""Before/after in one run: the same benchmarks on an older revision and on this checkout, interleaved.

Each round runs every benchmark once on each side, alternating which side goes first, each side with its own
``benchmarks/`` script and its own ``src/`` (a ``git worktree`` of the base revision on ``PYTHONPATH``), so both see
the same machine load. The report lists, for every timing in the benchmarks' JSON (keys ending in ``ms``, ``s``,
``_s``, ``per_adapter...`` or ``ratio``), the median over rounds on each side and after / before.

Usage::

    python benchmarks/compare_revisions.py --base 4b06c1c --rounds 3 --json benchmarks/results/cpu/before_after.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: script -> its arguments: small shapes that still run the measured path (seconds each on 2 CPU cores)
DEFAULT_BENCHMARKS = {
    "mixed_batch": ["--shape", "smoke", "--kinds", "bitfit"],
    "resident_adapters": ["--counts", "10,100,1000", "--window", "20", "--batches", "10"],
    "adapter_io": ["--kinds", "bitfit", "--load-repeats", "10", "--fp-repeats", "3", "--resident", "50",
                   "--switch-repeats", "200"],
}
TIMING_SUFFIXES = ("/ms", "/s", "_s", "_ms", "_ms_median", "_ms_p90", "/seconds", "ratio")


def timings(tree: Any, path: str = "") -> dict[str, float]:
    """Every numeric leaf of a benchmark's JSON whose key reads as a time or a ratio, by its path."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("env", "spec", "rounds", "check"):
                continue
            out.update(timings(value, f"{path}/{key}"))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            out.update(timings(value, f"{path}[{i}]"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and path.endswith(TIMING_SUFFIXES):
        out[path] = float(tree)
    return out


def run_side(root: Path, script: str, args: list[str], out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(root / "benchmarks" / f"{script}.py"), *args, "--json", str(out)]
    subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return timings(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. a commit id)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(DEFAULT_BENCHMARKS), help="comma-separated benchmark names")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    chosen = {name: DEFAULT_BENCHMARKS[name] for name in args.only.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(base), args.base], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        try:
            sides = {"before": base, "after": REPO}
            samples: dict[str, dict[str, dict[str, list[float]]]] = {n: {"before": {}, "after": {}} for n in chosen}
            for round_ in range(args.rounds):
                for name, script_args in chosen.items():
                    order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
                    for side in order:
                        print(f"round {round_ + 1}/{args.rounds}: {name} ({side})", flush=True)
                        got = run_side(sides[side], name, script_args, Path(tmp) / f"{name}-{side}.json")
                        for key, value in got.items():
                            samples[name][side].setdefault(key, []).append(value)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    report: dict[str, Any] = {"base": args.base, "rounds": args.rounds, "benchmarks": {}}
    for name, by_side in samples.items():
        rows = {}
        for key in sorted(set(by_side["before"]) & set(by_side["after"])):
            before, after = statistics.median(by_side["before"][key]), statistics.median(by_side["after"][key])
            rows[key] = {"before": before, "after": after, "after_over_before": after / before if before else None}
            ratio = rows[key]["after_over_before"]
            print(f"{name:18s} {key:60s} {before:12.4g} {after:12.4g}  x{ratio:.3f}" if ratio else f"{name} {key}")
        report["benchmarks"][name] = {"args": chosen[name], "timings": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
