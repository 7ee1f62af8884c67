"""The product's own training path on the accuracy suite: ``bitfit_peft.training.train`` with the default recipe,
with ``learning_rate="auto"`` and with ``cls_attention_init=True``, on the reduced setting's splits (per task:
train 400, dev 200, test 400).

The suite's BitFit row trains in the benchmark's own loop (``loop.py``). This script runs what users run instead
(Trainer, a checkpoint and a dev evaluation each epoch, the early-stopping callback, ``--lr auto``'s range test)
on the same examples, writes each split as a JSONL file, and measures test accuracy on the *saved* adapter loaded
back with ``PeftModel.from_pretrained``. Full fine-tuning (the suite's protocol, seed 0, at the LR given by
``--full-lr``) is trained once per task in the same process as the wall-time reference (``--full-lr 0``: none).
Each run keeps the epoch its mode's recipe keeps (``defaults``: the last; the others: the best on dev), and
nothing else is selected: every mode is a fixed procedure, so their test
results can be reported side by side; the dev table (``dev_table``) is the evidence for which should be the default.

Example:
    $ python -m benchmarks.accuracy.product_train --tasks trec movie --seeds 0 1 --modes default auto
    $ python -m benchmarks.accuracy.product_train --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.data import Split, subsample  # noqa: E402
from benchmarks.accuracy.loop import per_example  # noqa: E402
from benchmarks.accuracy.more_seeds import PHASE as EXTRA_PHASE  # noqa: E402
from benchmarks.accuracy.report import load_results, mean_std, publish, selected_runs  # noqa: E402
from benchmarks.accuracy.run import SETTINGS, Runner, accuracy, model_path  # noqa: E402

RESULTS = REPO / "benchmarks" / "accuracy" / "results" / "cpu_reduced_product_train.jsonl"
#: the ``defaults --per-epoch`` runs that ``epoch_selection.py`` reads; the report includes them
PER_EPOCH_RESULTS = RESULTS.with_name("cpu_reduced_epoch_selection.jsonl")
#: default: the recipe with ``cls_attention_init=False``; auto: ``learning_rate="auto"``; cls / cls_auto: the recipe
#: with ``cls_attention_init=True`` / ``"auto"``; these four keep the best dev epoch (``restore_best_epoch=True``, the
#: recipe before round 6). defaults: ``train()`` with nothing overridden (today: ``"auto"``, the last epoch).
MODES = ("default", "auto", "cls", "cls_auto", "defaults")
CLS_INIT = {"cls": True, "cls_auto": "auto"}
LABELS = {"default": "`--cls-init off`", "auto": "`--lr auto`", "cls": "`--cls-init on`",
          "cls_auto": "`--cls-init auto`", "defaults": "defaults (`auto`, last epoch)"}  # fmt: skip


class PerEpoch(TrainerCallback):
    """At every dev evaluation: per-example dev correctness and loss (length-sorted, as ``train`` orders dev) and
    test correctness, so that best-epoch selection rules can be compared afterwards (``epoch_selection.py``)."""

    def __init__(self, runner: Runner, task: str) -> None:
        self.sets = {part: runner.encoded(task, part, None) for part in ("dev", "test")}
        self.device, self.steps = runner.device, set()
        self.log: dict[str, Any] = {"epoch": [], "dev": [], "test": [], "seconds": 0.0}  # seconds: its own cost

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step in self.steps:  # train()'s closing evaluation: no new epoch
            return
        self.steps.add(state.global_step)
        t0, was, out = time.perf_counter(), model.training, {}
        for part, data in self.sets.items():
            correct, loss = per_example(model, data, self.device, 64)
            out[part] = (correct, [round(x, 5) for x in loss])
        model.train(was)
        self.log["epoch"].append(state.epoch)
        self.log["dev"].append({"correct": out["dev"][0], "loss": out["dev"][1]})
        self.log["test"].append(out["test"][0])
        self.log["seconds"] += time.perf_counter() - t0


def write_split(split: Split, path: Path) -> Path:
    """One ``{"text", "label"}`` JSON object per line (integer labels keep the suite's class ids)."""
    with path.open("w") as fh:
        for text, label in zip(split.texts, split.labels, strict=True):
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def test_accuracy(adapter_dir: Path, num_labels: int, runner: Runner, task: str) -> float:
    """Test accuracy of the saved adapter, loaded onto a fresh base with ``PeftModel.from_pretrained``."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return accuracy(model, runner.encoded(task, "test", None), runner.device, runner.setting.eval_batch_size)


def run_one(
    runner: Runner, task: str, mode: str, seed: int, tmp: Path, epochs: float | None = None, per_epoch: bool = False
) -> dict[str, Any]:
    """Train with ``bitfit_peft.training.train`` in ``mode`` and evaluate the saved adapter on test (``per_epoch``:
    also record :class:`PerEpoch`'s figures)."""
    from bitfit_peft.training import train

    s = runner.setting
    d = runner.task(task)
    files = {part: tmp / f"{task}_{part}.jsonl" for part in ("train", "dev")}
    for part, path in files.items():  # the same subsample for every mode and seed: written once per task
        if not path.exists():
            write_split(subsample(getattr(d, part), getattr(s, f"{part}_cap"), seed=0), path)
    out = tmp / f"{task}_{mode}_{seed}"
    fixed = {} if mode == "defaults" else {"cls_attention_init": CLS_INIT.get(mode, False), "restore_best_epoch": True}
    if mode == "auto":
        fixed["learning_rate"] = "auto"
    if epochs is not None:
        fixed["num_epochs"] = epochs
    watch = PerEpoch(runner, task) if per_epoch else None
    res = train(
        model=model_path(), data=str(files["train"]), dev_data=str(files["dev"]), output_dir=out,
        batch_size=s.batch_size, max_length=s.max_length, seed=seed, eval_before=False, quiet=True,
        callbacks=[watch] if watch else (), **fixed,
    )  # fmt: skip
    summary = json.loads((out / "bitfit_training.json").read_text())
    search = res.extra.get("lr_search") or {}
    return dict(
        task=task, mode=mode, seed=seed, lr=summary["optimisation"]["learning_rate"],
        dev_acc=res.accuracy_after, test_acc=test_accuracy(out, d.num_labels, runner, task),
        epochs_run=res.epochs_run, train_seconds=res.train_time_s, wall_seconds=res.wall_time_s,
        search_seconds=search.get("seconds", 0.0), search_dev_loss=search.get("dev_loss"),
        cls_init_enabled="cls_attention_init" in res.extra, cls_probe=res.extra.get("cls_probe"),
        restore_best_epoch=summary["optimisation"]["restore_best_epoch"], **({"per_epoch": watch.log} if watch else {}),
    )  # fmt: skip


def full_reference(runner: Runner, task: str, lr: float) -> dict[str, Any]:
    """Full fine-tuning at the suite's protocol (seed 0): the wall-time reference, measured in this process."""
    r, _ = runner.one(task, "full", lr, 0, runner.setting.train_cap, "reference", with_test=True)
    return as_reference(asdict(r))


def as_reference(run: dict[str, Any]) -> dict[str, Any]:
    """A suite run record (full FT) as this script's ``mode="full"`` reference record."""
    return dict(task=run["task"], mode="full", seed=run["seed"], lr=run["lr"], dev_acc=run["dev_acc"],
                test_acc=run["test_acc"], train_seconds=run["train_seconds"], wall_seconds=run["seconds"])  # fmt: skip


def suite_references(paths: list[Path], tasks: set[str]) -> list[dict[str, Any]]:
    """Full FT reference records of ``tasks``: the suite's dev-selected run (seed 0) and every further seed at that
    LR (the suite's ``seed`` phase, ``more_seeds.py``'s ``extra_seed``), once per (task, seed)."""
    lrs = {r["task"]: r["lr"] for path in paths for r in selected_runs(path, "full")}
    runs = {
        (r["task"], r["seed"]): as_reference(r)
        for path in paths for r in load_results(path)
        if r["method"] == "full" and r["task"] in tasks and r["phase"] in ("selected", "seed", EXTRA_PHASE)
        and r["lr"] == lrs.get(r["task"])
    }  # fmt: skip
    return list(runs.values())


def _spread(values: list[float], fmt: str = ".1f") -> str:
    """``mean ± std (n)`` of ``values``, or "–" when there are none."""
    if not values:
        return "–"
    mu, sd = mean_std(values)
    return f"{mu:{fmt}} ± {sd:{fmt.lstrip('+')}} ({len(values)})"


def _paired_gap(rows: list[dict[str, Any]], mode: str, reference: str) -> str:
    """Test accuracy of ``mode`` minus ``reference`` over the seeds both ran: ``mean ± standard error (n)``."""
    ref = {r["seed"]: 100 * r["test_acc"] for r in rows if r["mode"] == reference}
    diffs = [100 * r["test_acc"] - ref[r["seed"]] for r in rows if r["mode"] == mode and r["seed"] in ref]
    if len(diffs) < 2:
        return "–"
    mu, sd = mean_std(diffs)
    return f"{mu:+.1f} ± {sd / len(diffs) ** 0.5:.1f} ({len(diffs)})"


def markdown(records: list[dict[str, Any]]) -> str:
    """Per task: test accuracy (mean ± std over seeds), LRs picked by ``auto`` and wall time against full FT."""
    lines = [
        f"| task | full FT | {' | '.join(LABELS[m] for m in MODES)} | defaults − full FT, paired: mean ± s.e. "
        f"(seeds) | `--lr auto` picked | wall / full FT: {', '.join(LABELS[m] for m in MODES)} |",
        "|---" * (len(MODES) + 5) + "|",
    ]
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        fulls = [r for r in rows if r["mode"] == "full"]
        full = next((r for r in fulls if r["seed"] == 0), None)  # the wall-time reference
        cells, walls = [], []
        for mode in MODES:
            runs = [r for r in rows if r["mode"] == mode]
            accs = [100 * r["test_acc"] for r in runs]
            cells.append(_spread(accs))
            # PerEpoch's own evaluations do not count; runs recorded before it timed itself are left out
            timed = [r for r in runs if "seconds" in r.get("per_epoch", {"seconds": 0.0})]
            if timed and full:
                secs = statistics.fmean(r["train_seconds"] + r["search_seconds"] - r.get("per_epoch", {}).get(
                    "seconds", 0.0) for r in timed)  # fmt: skip
                walls.append(f"{secs / full['train_seconds']:.2f}x")
            else:
                walls.append("–")
        picks = ", ".join(f"{r['lr']:g}" for r in rows if r["mode"] == "auto") or "–"
        ref = _spread([100 * r["test_acc"] for r in fulls])
        gap = _paired_gap(rows, "defaults", "full")
        lines.append(f"| {task} | {ref} | {' | '.join(cells)} | {gap} | {picks} | {', '.join(walls)} |")
    return "\n".join(lines)


def dev_table(records: list[dict[str, Any]]) -> str:
    """Per task: dev accuracy (mean ± std over seeds) of each mode, ``--cls-init on`` minus ``off`` over the seeds
    both ran, and what ``auto`` makes of it (the evidence a default is decided on; test decides nothing). The last
    row averages the per-task gains over the tasks (the figure the adoption rule reads)."""
    lines = [
        f"| task | full FT dev | {' | '.join(LABELS[m] for m in MODES)} | on − off (seeds) "
        "| auto: probe [CLS] / mean, decision | auto − off (seeds) |",
        "|---" * (len(MODES) + 5) + "|",
    ]
    task_gains: dict[str, list[float]] = {"on": [], "auto": []}
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        full = _spread([100 * r["dev_acc"] for r in rows if r["mode"] == "full"])
        by_mode = {m: {r["seed"]: 100 * r["dev_acc"] for r in rows if r["mode"] == m} for m in MODES}
        cells = [_spread(list(by_mode[mode].values())) for mode in MODES]
        both = sorted(set(by_mode["default"]) & set(by_mode["cls"]))
        diffs = [by_mode["cls"][s] - by_mode["default"][s] for s in both]
        probe, auto_gains = auto_decision(rows)
        for key, gains in (("on", diffs), ("auto", auto_gains)):
            if gains:
                task_gains[key].append(statistics.fmean(gains))
        gain_cells = f"{_spread(diffs, '+.2f')} | {probe} | {_spread(auto_gains, '+.2f')}"
        lines.append(f"| {task} | {full} | {' | '.join(cells)} | {gain_cells} |")
    means = {k: f"{statistics.fmean(v):+.2f} ({len(v)} task{'s' * (len(v) != 1)})" if v else "–"
             for k, v in task_gains.items()}  # fmt: skip
    lines.append(f"| mean |{' |' * (len(MODES) + 1)} {means['on']} | | {means['auto']} |")
    return "\n".join(lines)


def auto_decision(rows: list[dict[str, Any]]) -> tuple[str, list[float]]:
    """``--cls-init auto``'s probe and decision (from its runs: the probe does not depend on the seed) and its dev
    gains over ``off``: ``on − off`` over the seeds both ran where it decides on, 0 on every ``off`` seed where it
    decides off (it then trains exactly as ``off``, ``tests/test_recipe.py``). Its own runs must match the mode it
    picked; a mismatch is an error. No ``cls_auto`` runs: ``("–", [])``."""
    runs = [r for r in rows if r["mode"] == "cls_auto"]
    if not runs:
        return "–", []
    if len({r["cls_init_enabled"] for r in runs}) != 1:
        raise ValueError(f"{rows[0]['task']}: --cls-init auto decided differently across seeds")
    on, p = runs[0]["cls_init_enabled"], runs[0]["cls_probe"]
    twin = {(r["seed"]): r["dev_acc"] for r in rows if r["mode"] == ("cls" if on else "default")}
    if any(r["seed"] in twin and r["dev_acc"] != twin[r["seed"]] for r in runs):
        raise ValueError(f"{rows[0]['task']}: a --cls-init auto run differs from the {'on' if on else 'off'} run")
    dev = {m: {r["seed"]: 100 * r["dev_acc"] for r in rows if r["mode"] == m} for m in ("default", "cls")}
    seeds = sorted(s for s in dev["default"] if not on or s in dev["cls"])
    gains = [dev["cls"][s] - dev["default"][s] if on else 0.0 for s in seeds]
    return f"{p['first_token']:.1f} / {p['mean_pooled']:.1f}, {'on' if on else 'off'}", gains


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=list(SETTINGS["reduced"].tasks))
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--full-lr", type=float, default=1.5e-4, help="full FT reference LR (0: no reference run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--reference", type=Path, nargs="*", default=None, metavar="RUNS_JSONL",
        help="report against the suite's dev-selected full FT (every seed at its LR) in these files instead of own "
        "reference runs",
    )  # fmt: skip
    p.add_argument("--epochs", type=float, default=None, help="planned epochs (default: the recipe's)")
    p.add_argument("--per-epoch", action="store_true", help="record per-epoch dev / test figures (PerEpoch)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--also", nargs="*", type=Path, default=[PER_EPOCH_RESULTS], help="more records for the report")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--doc", type=Path, default=None, help="also write the table into this page (the research log)")
    args = p.parse_args(argv)
    files = [f for f in dict.fromkeys((args.out, *args.also)) if f.exists()]
    records = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    if not args.report_only:
        torch.set_num_threads(args.threads)
        runner = Runner(SETTINGS["reduced"], torch.device("cpu"), Path("/dev/null"))
        done = {(r["task"], r["mode"], r["seed"]) for r in records}

        def keep(rec: dict[str, Any]) -> None:
            records.append(rec)
            with args.out.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(json.dumps({k: v for k, v in rec.items() if k != "per_epoch"}), flush=True)

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bitfit-acc-product-") as tmp:
            for task in args.tasks:
                if args.full_lr and (task, "full", 0) not in done:
                    keep(full_reference(runner, task, args.full_lr))
                for mode in args.modes:
                    for seed in args.seeds:
                        if (task, mode, seed) not in done:
                            keep(run_one(runner, task, mode, seed, Path(tmp), args.epochs, args.per_epoch))
        print(f"wall time {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if args.reference:  # the suite's dev-selected full FT as the reference of each task
        tasks = {r["task"] for r in records}
        records = [r for r in records if r["mode"] != "full"] + suite_references(args.reference, tasks)
    dev = "Dev accuracy (%) of the saved adapters, the same runs (defaults: the last epoch; the others: the best):"
    publish(f"{markdown(records)}\n\n{dev}\n\n{dev_table(records)}", args.doc, "product_train")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
