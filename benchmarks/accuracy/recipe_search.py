"""Dev-only search for BitFit's default recipe (issue 15): LR x head-LR factor x epochs, early stopping simulated.

Every configuration trains BitFit (all biases) for its full planned epochs with a dev evaluation after each
epoch and no early stopping, so the dev curve of one run also gives the result of every early-stopping patience
(stopping only truncates a run; the steps before it are identical). Full fine-tuning at the suite's protocol
(dev-selected LR) runs once per task as the wall-time reference. The test split is never evaluated here.

Example:
    $ python -m benchmarks.accuracy.recipe_search --tasks trec movie --lrs 3e-3 1e-2 3e-2 --head-factors 1 3 10
    $ python -m benchmarks.accuracy.recipe_search --report-only          # tables from the results file
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.report import publish, selected_runs  # noqa: E402
from benchmarks.accuracy.run import SETTINGS, Runner, recipe_schedule  # noqa: E402

RESULTS = REPO / "benchmarks" / "accuracy" / "results" / "cpu_reduced_recipe_search.json"


def early_stop(curve: list[float], patience: int | None) -> tuple[float, int, int]:
    """(best dev accuracy, best evaluation, evaluations run) of ``curve`` under early stopping with ``patience``."""
    best_i, run = 0, len(curve)
    for i, acc in enumerate(curve):
        if acc > curve[best_i]:
            best_i = i
        elif patience and i - best_i >= patience:
            run = i + 1
            break
    return curve[best_i], best_i + 1, run


def summarise(records: list[dict[str, Any]], patience: int | None) -> list[dict[str, Any]]:
    """One row per (task, lr, head factor, epochs): mean over seeds of the early-stopped dev accuracy and cost."""
    ref = {r["task"]: r for r in records if r["method"] == "full"}
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] != "full":
            sc = {**r["schedule"], "method": r["method"]}
            key = (r["task"], r["lr"], sc["head_lr_factor"], sc["epochs"], sc["warmup_frac"], sc["scheduler"],
                   sc.get("batch_size") or SETTINGS["reduced"].batch_size, _variant(sc))  # fmt: skip
            cells.setdefault(key, []).append(r)
    rows = []
    for (task, lr, hf, ep, wu, sch, bs, var), runs in sorted(cells.items()):
        stops = [early_stop(r["dev_curve"], patience) for r in runs]
        # wall time if stopped early: the run's training time scaled by the share of evaluations run
        secs = [r["train_seconds"] * run / len(r["dev_curve"]) for r, (_, _, run) in zip(runs, stops, strict=True)]
        full = ref.get(task)
        rows.append(
            dict(
                task=task, lr=lr, head_factor=hf, epochs=ep, warmup=wu, scheduler=sch, batch=bs, variant=var,
                seeds=len(runs),
                dev=100 * statistics.fmean(a for a, _, _ in stops),
                best_epoch=statistics.fmean(b for _, b, _ in stops),
                epochs_run=statistics.fmean(n for _, _, n in stops),
                seconds=statistics.fmean(secs),
                full_dev=100 * full["dev_acc"] if full else None,
                wall_ratio=statistics.fmean(secs) / full["train_seconds"] if full else None,
            )
        )  # fmt: skip
    return rows


def markdown(records: list[dict[str, Any]], patience: int | None) -> str:
    lines = [
        f"early-stopping patience {patience}: dev accuracy (%) of the best epoch, mean over seeds",
        "",
        "| task | lr | head × | batch | epochs | warm-up, schedule | variant | seeds | dev | best epoch | epochs run "
        "| s | full FT dev | wall / full FT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summarise(records, patience):
        full = "–" if r["full_dev"] is None else f"{r['full_dev']:.1f}"
        ratio = "–" if r["wall_ratio"] is None else f"{r['wall_ratio']:.2f}"
        lines.append(
            f"| {r['task']} | {r['lr']:g} | {r['head_factor']:g} | {r['batch']} | {r['epochs']:g} | "
            f"{r['warmup']:g}, {r['scheduler']} | {r['variant']} | "
            f"{r['seeds']} | {r['dev']:.1f} | "
            f"{r['best_epoch']:.1f} | {r['epochs_run']:.1f} | {r['seconds']:.0f} | {full} | {ratio} |"
        )
    return "\n".join(lines)


def _variant(schedule: dict[str, Any]) -> str:
    """What a run changed beyond LR / head / length / batch / warm-up: method, dropout, pooler, EMA ("–": none)."""
    parts = [] if schedule.get("method", "bitfit") == "bitfit" else [schedule["method"]]
    if schedule.get("dropout") is not None:
        parts.append(f"dropout {schedule['dropout']:g}")
    if schedule.get("cls_init"):
        parts.append("uniform [CLS] init")
    if schedule.get("ema") is not None:
        parts.append(f"EMA {schedule['ema']:g}")
    if schedule.get("pooler_lr") is not None:
        parts.append(f"pooler weight at {schedule['pooler_lr']:g}")
    return ", ".join(parts) or "–"


def _key(schedule: dict[str, Any]) -> str:
    """A schedule's identity in the results file (records from before ``batch_size`` existed match None)."""
    return json.dumps({k: v for k, v in schedule.items() if k != "epochs" and v is not None}, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=["trec", "movie"])
    p.add_argument("--lrs", nargs="*", type=float, default=[3e-3, 1e-2, 3e-2])
    p.add_argument("--head-factors", nargs="*", type=float, default=[1.0, 3.0, 10.0])
    p.add_argument("--epochs", nargs="*", type=float, default=[8.0])
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[0], help="BitFit batch sizes (0: the setting's)")
    p.add_argument("--method", default="bitfit", choices=["bitfit", "bitfit_qi"], help="the method searched")
    p.add_argument("--dropouts", nargs="*", type=float, default=[-1.0], help="dropout rates (-1: the model's)")
    p.add_argument("--cls-init", nargs="*", type=int, default=[0], help="1: uniform [CLS] attention init")
    p.add_argument("--emas", nargs="*", type=float, default=[0.0], help="EMA decays of the weights (0: none)")
    p.add_argument("--pooler-lrs", nargs="*", type=float, default=[0.0], help="pooler weight LRs (0: frozen)")
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--scheduler", default="linear")
    p.add_argument("--full-lr", type=float, default=1.5e-4, help="full FT reference LR (the suite's dev selection)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--patience", nargs="*", type=int, default=[2])
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--merge", nargs="*", type=Path, default=[], help="add the BitFit runs of other results files")
    p.add_argument(
        "--reference", type=Path, default=None, metavar="RUNS_JSONL",
        help="replace the full FT references by the suite's dev-selected full FT runs (seed 0) of this file",
    )  # fmt: skip
    p.add_argument("--doc", type=Path, default=None, help="also write the tables into this page (the research log)")
    args = p.parse_args(argv)
    records: list[dict[str, Any]] = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    for other in args.merge:
        records += [r for r in json.loads(other.read_text())["runs"] if r["method"] != "full"]
    if args.reference:
        records = [r for r in records if r["method"] != "full"] + selected_runs(args.reference, "full")
    if args.merge or args.reference:
        args.out.write_text(json.dumps({"setting": asdict(SETTINGS["reduced"]), "runs": records}, indent=1) + "\n")
    if not args.report_only:
        torch.set_num_threads(args.threads)
        s = SETTINGS["reduced"]
        runner = Runner(s, torch.device("cpu"), Path("/dev/null"))
        done = {(r["task"], r["method"], r["lr"], r["seed"], _key(r["schedule"])) for r in records}

        def run(task: str, method: str, lr: float, seed: int, sched: Any) -> None:
            key = (task, method, lr, seed, _key(asdict(sched)))
            if key in done:
                return
            res, _ = runner.one(task, method, lr, seed, s.train_cap, "search", with_test=False, sched=sched)
            rec = asdict(res)
            rec["schedule"]["epochs"] = sched.steps / max(1, sched.eval_every or sched.steps)
            records.append(rec)
            args.out.write_text(json.dumps({"setting": asdict(s), "runs": records}, indent=1) + "\n")
            print(f"{task} {method} lr={lr:g} seed={seed} {rec['schedule']} curve={rec['dev_curve']} "
                  f"({rec['train_seconds']:.0f}s)", flush=True)  # fmt: skip

        t0 = time.perf_counter()
        for task in args.tasks:
            n = s.train_cap
            assert n is not None
            if not any(r["task"] == task and r["method"] == "full" for r in records):
                run(task, "full", args.full_lr, 0, runner.schedule("full", n))
            for ep in args.epochs:
                for lr in args.lrs:
                    grid = itertools.product(args.head_factors, args.batch_sizes, args.dropouts, args.pooler_lrs,
                                             args.emas, args.cls_init, args.seeds)  # fmt: skip
                    for hf, bs, dp, plr, ema, ci, seed in grid:
                        sched = recipe_schedule(
                            n, s, head_lr_factor=hf, patience=None, batch_size=bs or None, warmup_frac=args.warmup,
                            scheduler=args.scheduler, dropout=None if dp < 0 else dp, pooler_lr=plr or None,
                            ema=ema or None, cls_init=bool(ci),
                        )  # fmt: skip
                        per_epoch = sched.eval_every or 1
                        sched = type(sched)(**{**asdict(sched), "steps": round(ep * per_epoch)})
                        run(task, args.method, lr, seed, sched)
        print(f"search wall time {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    publish("\n\n".join(markdown(records, pat) for pat in args.patience), args.doc, "recipe_search")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
