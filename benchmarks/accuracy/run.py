"""Accuracy benchmark: BitFit vs full fine-tuning, PEFT LoRA r8 and PEFT BEFT on MiniLM-L6.

Methods (all with a fresh, trained classification head):

- ``full``: every parameter trained.
- ``bitfit``: BitFit, all bias terms (``BitFitConfig(bias_terms="all")``).
- ``bitfit_qi``: BitFit, the paper's small subset ``bias_terms=["query", "intermediate"]``.
- ``bitfit_cls``: ``bitfit`` started from a uniform ``[CLS]`` attention (``train(cls_attention_init=True)``).
- ``lora_r8``: ``peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])``.
- ``beft``: ``peft.BeftConfig()`` (PEFT's default BEFT targets for BERT: the value bias).

Protocol: for each task and method, every learning rate of a small grid is trained with seed 0 and the one
with the best *dev* accuracy is kept; the remaining seeds are trained at that learning rate; the table reports
mean ± std of *test* accuracy over seeds. The test split is only evaluated for the dev-selected runs. A
data-size sweep trains ``bitfit`` and ``full`` on subsampled training sets of two tasks.

Settings (``--reduced`` for a 2-core CPU in < 30 min, ``--full`` for a GPU) are defined in :data:`SETTINGS`;
``benchmarks/accuracy/LOG.md`` documents exactly what ``--reduced`` cuts, and ``--report-only`` writes its tables
there (between ``<!-- results:<setting>:start/end -->`` markers; ``docs/accuracy.md`` summarises them).

Example:
    $ python -m benchmarks.accuracy.run --reduced            # ~25 min on 2 CPU cores
    $ python -m benchmarks.accuracy.run --full --device cuda
    $ python -m benchmarks.accuracy.run --smoke              # seconds; checks the pipeline only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
LOG = REPO / "benchmarks" / "accuracy" / "LOG.md"  #: the research log: the generated results blocks live there
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.data import TaskData, build_splits, subsample  # noqa: E402
from benchmarks.accuracy.loop import (  # noqa: E402, F401 - re-exported: prune_sweep / inspect_example use R.*
    Encoded,
    RunResult,
    Schedule,
    accuracy,
    build_model,
    count_params,
    legacy_schedule,
    model_path,
    recipe_schedule,
    tokenizer,
    train,
    train_batches,
)
from benchmarks.accuracy.report import load_results, platform_line, report, write_doc_section  # noqa: E402, F401
from benchmarks.accuracy.settings import GRID_EXTEND, METHODS, SETTINGS, Setting  # noqa: E402, F401


# ---------------------------------------------------------------------------------------------- driver
class BudgetExceeded(RuntimeError):
    """The ``--time-budget`` ran out; no new training run is started."""


@dataclass
class Runner:
    setting: Setting
    device: torch.device
    log_path: Path
    deadline: float | None = None  #: ``time.perf_counter()`` value after which no run starts
    #: method -> Schedule overrides of :func:`recipe_schedule`; methods not listed use :func:`legacy_schedule`
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (task, method, n_train) -> Schedule overrides from :meth:`calibrate` (equal wall time)
    step_budget: dict[tuple[str | None, str, int], dict[str, Any]] = field(default_factory=dict)
    calibration: dict[tuple[str, str, int | None], float] = field(default_factory=dict)  #: s/step
    #: best seed-0 (dev accuracy, lr) of an earlier grid per (task, method, size): ``--extend`` runs only add LRs
    prior: dict[tuple[str, str, int | None], tuple[float, float]] = field(default_factory=dict)
    results: list[RunResult] = field(default_factory=list)
    _cache: dict[tuple[str, str, int | None], Encoded] = field(default_factory=dict)
    _tasks: dict[str, TaskData] = field(default_factory=dict)

    def task(self, name: str) -> TaskData:
        if name not in self._tasks:
            self._tasks[name] = build_splits(name)
        return self._tasks[name]

    def encoded(self, name: str, part: str, size: int | None, seed: int = 0) -> Encoded:
        """Tokenised split; train is subsampled to ``size``, dev/test to the setting's caps (fixed seed)."""
        key = (name, part, size if part == "train" else None)
        if key not in self._cache:
            d = self.task(name)
            split = getattr(d, part)
            cap = size if part == "train" else getattr(self.setting, f"{part}_cap")
            split = subsample(split, cap, seed=seed)
            self._cache[key] = Encoded(split, tokenizer(), self.setting.max_length)
        return self._cache[key]

    def evaluate(self, model: nn.Module, name: str, part: str) -> float:
        return accuracy(model, self.encoded(name, part, None), self.device, self.setting.eval_batch_size)

    def log(self, r: RunResult) -> None:
        self.results.append(r)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(asdict(r)) + "\n")
        test = "" if r.test_acc is None else f" test={r.test_acc:.4f}"
        size = "" if r.size is None and r.phase != "sweep" else f" size={r.size}"
        print(
            f"[{r.phase}] {r.task:5s} {r.method:9s} lr={r.lr:g} seed={r.seed}{size} n={r.n_train} "
            f"steps={r.steps} dev={r.dev_acc:.4f}{test} loss={r.final_loss:.3f} ({r.seconds:.0f}s)",
            flush=True,
        )

    def schedule(self, method: str, n_train: int, task: str | None = None) -> Schedule:
        if method in self.recipes or method in self.setting.recipe_methods:
            over = {
                **self.setting.recipe_overrides.get(method, {}), **self.recipes.get(method, {}),
                **self.step_budget.get((task, method, n_train), {}),
            }  # fmt: skip
            return recipe_schedule(n_train, self.setting, **over)
        return legacy_schedule(n_train, self.setting)

    def calibrate(self, name: str, size: int | None) -> None:
        """Equal wall time: give each ``equal_wall`` method BitFit's seconds per run, from measured step times."""
        methods = ("bitfit", *self.setting.equal_wall, *(("full",) if "full" in self.setting.methods else ()))
        if not self.setting.equal_wall or any((name, m, size) in self.calibration for m in methods):
            return
        tr = self.encoded(name, "train", size)
        d = self.task(name)
        secs = {}
        for m in methods:  # 3 warm-up + 12 timed steps of each method, same batches
            model = build_model(m, d.num_labels, 0).to(self.device)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            batches = list(train_batches(len(tr), self.setting.batch_size, 15, 0))
            for i, rows in enumerate(batches):
                if i == 3:
                    t0 = time.perf_counter()
                model(**tr.batch(rows, self.device)).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            secs[m] = (time.perf_counter() - t0) / 12
            del model, opt
        base = recipe_schedule(len(tr), self.setting)
        for m in methods:
            self.calibration[(name, m, size)] = secs[m]
            if m in self.setting.equal_wall:
                steps = max(1, round(base.steps * secs["bitfit"] / secs[m]))
                self.step_budget[(name, m, len(tr))] = {"steps": steps}
        print(f"[calibrate] {name}: s/step " + ", ".join(f"{m} {v:.3f}" for m, v in secs.items())
              + " -> steps " + ", ".join(f"{m} {self.step_budget[(name, m, len(tr))]['steps']}"
                                         for m in self.setting.equal_wall), flush=True)  # fmt: skip

    def one(
        self, name: str, method: str, lr: float, seed: int, size: int | None, phase: str, with_test: bool,
        sched: Schedule | None = None,
    ) -> tuple[RunResult, nn.Module]:  # fmt: skip
        d = self.task(name)
        t0 = time.perf_counter()
        if self.deadline is not None and t0 > self.deadline:
            raise BudgetExceeded(f"time budget used up before {phase} {name}/{method} lr={lr} seed={seed}")
        tr = self.encoded(name, "train", size)
        sched = sched or self.schedule(method, len(tr), name)
        dev_set = self.encoded(name, "dev", None) if sched.eval_every else None
        model, steps, loss, curve = train(method, lr, seed, tr, d.num_labels, self.setting, self.device, sched, dev_set)
        t_train = time.perf_counter() - t0
        dev = self.evaluate(model, name, "dev")
        test = None
        if with_test:
            test = self.evaluate(model, name, "test")
        trainable, total = count_params(model)
        r = RunResult(
            name, method, lr, seed, len(tr), steps, dev, test, trainable, total,
            time.perf_counter() - t0, phase, size, loss, asdict(sched), t_train, curve or None,
        )  # fmt: skip
        return r, model

    def select_and_seed(self, name: str, method: str, size: int | None, phase: str, seeds: int) -> float:
        """LR grid on seed 0 (dev only), then test of the selected model and the remaining seeds."""
        best: tuple[float, RunResult, nn.Module] | None = None
        prefix = "" if phase == "main" else "sweep_"
        original = list(self.setting.grid_override.get(method, self.setting.lr_grid[method]))
        grid, tried = original, []
        while True:
            for lr in (lr for lr in grid if lr not in tried):
                tried.append(lr)
                r, model = self.one(name, method, lr, 0, size, prefix + "grid", with_test=False)
                if best is None or r.dev_acc > best[0]:
                    best = (r.dev_acc, r, model)
                else:
                    del model
                self.log(r)
            assert best is not None
            wider = widen(grid, best[1].lr, original) if self.setting.extend_grid else grid
            if wider == grid:
                break
            grid = wider
        assert best is not None
        _, r0, model0 = best
        prior = self.prior.get((name, method, size))
        if prior is not None and prior[0] >= r0.dev_acc:
            return prior[1]  # grid extension lost on dev: the earlier selection (already seeded) stands
        test = self.evaluate(model0, name, "test")
        self.log(replace(r0, test_acc=test, phase=prefix + "selected"))  # a copy of the grid run, now tested
        del model0
        for seed in range(1, seeds):
            r, _ = self.one(name, method, r0.lr, seed, size, prefix + "seed", with_test=True)
            self.log(r)
        return r0.lr

    def run_main(self) -> dict[tuple[str, str], float]:
        chosen = {}
        for name in self.setting.tasks:
            if set(self.setting.equal_wall) & set(self.setting.methods):
                self.calibrate(name, self.setting.train_cap)
            for method in self.setting.methods:
                seeds = self.setting.seeds_override.get(method, self.setting.seeds)
                chosen[(name, method)] = self.select_and_seed(name, method, self.setting.train_cap, "main", seeds)
        return chosen

    def run_sweep(self, chosen: dict[tuple[str, str], float]) -> None:
        s = self.setting
        for name in s.sweep_tasks:
            n_all = len(self.task(name).train)
            for method in s.sweep_methods:
                for size in s.sweep_sizes:
                    if size is not None and size >= n_all:
                        size = None  # same as "all"
                    if size == s.train_cap and name in s.tasks:
                        continue  # identical to the main-table runs, reused in the report
                    if s.sweep_grid or (name, method) not in chosen:
                        self.select_and_seed(name, method, size, "sweep", s.sweep_seeds)
                        continue
                    lr = chosen[(name, method)]
                    for seed in range(s.sweep_seeds):
                        r, _ = self.one(name, method, lr, seed, size, "sweep_seed", with_test=True)
                        self.log(r)


def widen(grid: list[float], best: float, original: list[float], limit: int = 2) -> list[float]:
    """``grid`` plus one LR beyond the end dev selected (x2 above, /3 below), at most ``limit`` beyond ``original``.

    >>> widen([5e-5, 1.5e-4, 3e-4], 3e-4, [5e-5, 1.5e-4, 3e-4])
    [5e-05, 0.00015, 0.0003, 0.0006]
    >>> widen([5e-5, 1.5e-4, 3e-4], 1.5e-4, [5e-5, 1.5e-4, 3e-4])
    [5e-05, 0.00015, 0.0003]
    """
    if len(grid) < 2 or min(grid) < best < max(grid):
        return grid
    up = best == max(grid)
    added = [g for g in grid if (g > max(original) if up else g < min(original))]
    if len(added) >= limit:
        return grid
    return sorted({*grid, float(f"{best * 2:.3g}") if up else float(f"{best / 3:.3g}")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reduced", action="store_const", const="reduced", dest="setting")
    g.add_argument("--full", action="store_const", const="full", dest="setting")
    g.add_argument("--smoke", action="store_const", const="smoke", dest="setting")
    g.add_argument("--gpu-recipe", action="store_const", const="gpu_recipe", dest="setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--out", type=Path, default=None, help="results dir (default benchmarks/accuracy/results)")
    p.add_argument("--doc", type=Path, default=LOG, help="page whose results:<setting> block gets the tables")
    p.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--report-only", action="store_true", help="rebuild table/plots from the results files")
    p.add_argument("--skip-sweep", action="store_true", help="main table only")
    p.add_argument("--skip-main", action="store_true", help="sweep only (LR grid per size if none chosen)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no run starts after it")
    p.add_argument("--tasks", nargs="*", default=None, help="main-table tasks (default: the setting's)")
    p.add_argument("--sweep-tasks", nargs="*", default=None, help="sweep tasks (default: the setting's)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: the setting's)")
    p.add_argument(
        "--tag", default="",
        help="suffix of this process's results files (parallel shards), runs_<setting>_<tag>.jsonl: name it by what "
        "the shard runs, e.g. full_ft",
    )  # fmt: skip
    p.add_argument(
        "--extend",
        type=Path,
        default=None,
        metavar="RUNS_JSONL",
        help="add GRID_EXTEND's LRs to an earlier run (its results file); seeds only where the new LR wins on dev",
    )
    p.set_defaults(setting="reduced")
    args = p.parse_args(argv)

    s_all = SETTINGS[args.setting]
    s = s_all
    if args.tasks:
        s = replace(s, tasks=tuple(args.tasks))
    if args.sweep_tasks:
        s = replace(s, sweep_tasks=tuple(args.sweep_tasks))
    if args.methods:  # the sweep keeps only these methods too
        sweep = tuple(m for m in s.sweep_methods if m in args.methods)
        s = replace(s, methods=tuple(args.methods), sweep_methods=sweep)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = args.out or (REPO / "benchmarks" / "accuracy" / "results")
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    if args.report_only:  # merge every shard of this setting
        results, seen = [], set()
        for r in (r for f in sorted(out.glob(f"runs_{s.name}*.jsonl")) for r in load_results(f)):
            key = tuple(r.get(k) for k in ("task", "method", "lr", "seed", "size", "phase", "steps", "schedule"))
            if str(key) not in seen:  # a run two shards both did (deterministic: same numbers) counts once
                seen.add(str(key))
                results.append(r)
        summaries = [json.loads(f.read_text()) for f in sorted(out.glob(f"summary_{s.name}*.json"))]
        wall = sum(x["wall_seconds"] for x in summaries) or None  # one summary per (merged) invocation
        stops = "; ".join(x["stopped"] for x in summaries if x.get("stopped")) or None
        platform = next((x["platform"] for x in summaries if x.get("platform")), None)
        print(report(results, s_all, args.doc, args.img_dir, wall, stops, platform))
        return 0
    log_path = out / f"runs_{s.name}{suffix}.jsonl"
    if log_path.exists():
        log_path.rename(log_path.with_suffix(".jsonl.bak"))
    print(f"setting {s.name}: {s.notes}", flush=True)
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget if args.time_budget else None
    runner = Runner(s, torch.device(args.device), log_path, deadline)
    if args.extend:
        s = replace(s, lr_grid={m: GRID_EXTEND[m] for m in s.methods})
        runner.setting = s
        for r in load_results(args.extend):
            if r["phase"] in ("grid", "sweep_grid"):
                key = (r["task"], r["method"], r.get("size"))
                if key not in runner.prior or r["dev_acc"] > runner.prior[key][0]:
                    runner.prior[key] = (r["dev_acc"], r["lr"])
    stopped = None
    try:
        chosen = {} if args.skip_main else runner.run_main()
        if not args.skip_sweep:
            runner.run_sweep(chosen)
    except BudgetExceeded as err:
        stopped = str(err)
        print(f"STOPPED: {stopped}", flush=True)
    wall = time.perf_counter() - t0
    results = [asdict(r) for r in runner.results]
    (out / f"summary_{s.name}{suffix}.json").write_text(
        json.dumps(
            {
                "setting": asdict(s),
                "wall_seconds": wall,
                "platform": platform_line(),
                "stopped": stopped,
                "load_average": os.getloadavg(),
                "seconds_per_step": [[t, m, n, v] for (t, m, n), v in runner.calibration.items()],
            },
            indent=2,
        )
    )
    if not args.tag:
        print(report(results, s, args.doc, args.img_dir, wall, stopped))
    print(f"total wall time {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
