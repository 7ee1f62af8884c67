"""More seeds of a suite method at the learning rate the suite selected on dev, for firmer baselines.

The reduced suite trains two seeds per cell; ``product_train.py`` runs the product's ``train()`` with eight. To
compare like with like, this script trains further seeds of one method (default: full fine-tuning) in the suite's
own loop, at each task's dev-selected LR read from a suite results file, and appends them (phase
``extra_seed``) to its own results file, which ``product_train.py --reference`` reads beside the suite's. Nothing is
selected here: the LR was fixed by the suite on seed 0's dev accuracy, and the new seeds only add test samples.
Runs already in the output file are skipped, so an interrupted invocation resumes.

Example:
    $ python -m benchmarks.accuracy.more_seeds --tasks trec sms --seeds 2 3 4 5 6 7 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.report import load_results, selected_runs  # noqa: E402
from benchmarks.accuracy.run import SETTINGS, Runner  # noqa: E402

RESULTS = REPO / "benchmarks" / "accuracy" / "results"
SUITE_RUNS = RESULTS / "runs_reduced_full_ft.jsonl"  #: the reduced suite's full FT runs
EXTRA_SEEDS = RESULTS / "cpu_reduced_full_extra_seeds.jsonl"  #: this script's output (not a suite shard)
PHASE = "extra_seed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="full")
    p.add_argument("--tasks", nargs="*", default=list(SETTINGS["reduced"].tasks))
    p.add_argument("--seeds", nargs="*", type=int, default=[2, 3, 4, 5, 6, 7])
    p.add_argument("--suite", type=Path, default=SUITE_RUNS, help="suite results file with the dev selection")
    p.add_argument("--out", type=Path, default=EXTRA_SEEDS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    lrs = {r["task"]: r["lr"] for r in selected_runs(args.suite, args.method)}
    missing = [t for t in args.tasks if t not in lrs]
    if missing:
        raise SystemExit(f"no dev-selected {args.method} run for {missing} in {args.suite}; run the suite first")
    done = {(r["task"], r["method"], r["seed"]) for r in load_results(args.out)}
    torch.set_num_threads(args.threads)
    setting = SETTINGS["reduced"]
    runner = Runner(setting, torch.device("cpu"), args.out)
    for task in args.tasks:
        for seed in args.seeds:
            if (task, args.method, seed) in done:
                continue
            r, _ = runner.one(task, args.method, lrs[task], seed, setting.train_cap, PHASE, with_test=True)
            runner.log(r)
    print(f"{len(runner.results)} runs appended to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
