"""Tables, plots and the ``benchmarks/accuracy/LOG.md`` blocks of the accuracy benchmark, from its results files."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.settings import (  # noqa: E402
    AUTO_METHOD,
    CLS_METHOD,
    METHOD_COLORS,
    METHOD_LABELS,
    Setting,
    feature_probe_path,
)


# ---------------------------------------------------------------------------------------------- report
def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _best_selected(results: list[dict[str, Any]], phase: str) -> dict[tuple, dict[str, Any]]:
    """{(task, method, size): the ``phase`` record with the best dev accuracy} (several grids may exist)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r["phase"] == phase and r["test_acc"] is not None:
            key = (r["task"], r["method"], r.get("size"))
            if key not in best or r["dev_acc"] > best[key]["dev_acc"]:
                best[key] = r
    return best


def _seeded(results: list[dict[str, Any]], prefix: str) -> dict[tuple, list[dict[str, Any]]]:
    """{(task, method, size): [selected run + seed runs at the selected LR and planned steps]}."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for key, sel in _best_selected(results, prefix + "selected").items():
        cells[key] = [sel] + [
            r
            for r in results
            if r["phase"] == prefix + "seed"
            and (r["task"], r["method"], r.get("size")) == key
            and (r["lr"], _planned(r)) == (sel["lr"], _planned(sel))
        ]
    return cells


def selected_runs(path: Path, method: str) -> list[dict[str, Any]]:
    """The main table's dev-selected (seed 0) runs of ``method`` in a suite results file, one per task."""
    return [r for r in load_results(path) if r["method"] == method and r["phase"] == "selected"]


def _planned(r: dict[str, Any]) -> int | None:
    """Planned steps of a run's schedule (None in files from before schedules were recorded)."""
    return (r.get("schedule") or {}).get("steps")


def main_table(results: list[dict[str, Any]], s: Setting) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """{(task, method): [runs with a test score]} for the main table (dev-selected LR, all seeds), plus the
    :data:`AUTO_METHOD` cells: a task's ``CLS_METHOD`` or ``bitfit`` runs, as the probe decides."""
    cells = {(t, m): runs for (t, m, _), runs in _seeded(results, "").items()}
    for (t, n), on in auto_decisions(s).items():
        if n == s.train_cap and (t, "bitfit") in cells and (t, CLS_METHOD) in cells:
            cells[(t, AUTO_METHOD)] = cells[(t, CLS_METHOD if on else "bitfit")]
    return cells


def auto_decisions(s: Setting) -> dict[tuple[str, int | None], bool]:
    """``--cls-init auto``'s decision per (task, training examples), from the feature probe's results for ``s``
    (none: ``{}``; records without a size are at the main table's ``train_cap``)."""
    from bitfit_peft.training.cls_init import FirstTokenProbe

    path = feature_probe_path(s.name)
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    by_key: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["task"], r.get("n_train", s.train_cap)), []).append(r)
    n_dev = s.dev_cap or 10**9
    return {
        key: FirstTokenProbe(max(r["cls"] for r in rs), max(r["mean"] for r in rs), key[1] or 0, n_dev).enable
        for key, rs in by_key.items()
    }


def _with_auto(methods: tuple[str, ...], cells: dict[tuple[str, str], Any]) -> list[str]:
    """``methods`` that have cells, with :data:`AUTO_METHOD` right after ``CLS_METHOD`` where it has cells."""
    out = [m for m in methods if any(k[1] == m for k in cells)]
    if any(k[1] == AUTO_METHOD for k in cells) and CLS_METHOD in out:
        out.insert(out.index(CLS_METHOD) + 1, AUTO_METHOD)
    return out


def markdown_main(results: list[dict[str, Any]], s: Setting) -> str:
    cells = main_table(results, s)
    tasks = [t for t in s.tasks if any(k[0] == t for k in cells)]
    methods = _with_auto(s.methods, cells)
    head = "| method | trainable params | " + " | ".join(tasks) + " | avg |"
    lines = [head, "|---" * (len(tasks) + 3) + "|"]
    means: dict[tuple[str, str], float] = {}
    for m in methods:
        row, avgs = [], []
        counted = [r for t in tasks for r in cells.get((t, m), [])]  # the smallest head (2 classes where a task has 2)
        fewest = min(counted, key=lambda r: r["trainable"]) if counted else None
        trainable = f"{fewest['trainable']:,} ({100 * fewest['trainable'] / fewest['total']:.2f}%)" if fewest else ""
        for t in tasks:
            runs = cells.get((t, m), [])
            mu, sd = mean_std([100 * r["test_acc"] for r in runs])
            means[(t, m)] = mu
            lr = runs[0]["lr"] if runs else math.nan
            row.append(f"{mu:.1f} ± {sd:.1f} <sub>lr {lr:g}</sub>" if runs else "–")
            if runs:
                avgs.append(mu)
        avg = f"{statistics.fmean(avgs):.1f}" if len(avgs) == len(tasks) else "–"
        lines.append(f"| {METHOD_LABELS[m]} | {trainable} | " + " | ".join(row) + f" | {avg} |")
    lines.append("")
    lines.append("Gaps (mean test accuracy, percentage points; positive = BitFit better):")
    lines.append("")
    lines.append("| gap | " + " | ".join(tasks) + " | avg |")
    lines.append("|---" * (len(tasks) + 2) + "|")
    pairs = (("bitfit", "full"), (CLS_METHOD, "full"), (AUTO_METHOD, "full"), ("bitfit", "lora_r8"),
             ("bitfit", "beft"), ("bitfit_qi", "full"))  # fmt: skip
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        gaps = [means[(t, a)] - means[(t, b)] for t in tasks]
        lines.append(
            f"| {METHOD_LABELS[a]} − {METHOD_LABELS[b]} | "
            + " | ".join(f"{g:+.1f}" for g in gaps)
            + f" | {statistics.fmean(gaps):+.1f} |"
        )
    return "\n".join(lines)


BEFORE_RUNS = "cpu_reduced_before_runs.jsonl"  #: the reduced suite before issue 15 (old BitFit protocol)


def _cell_stats(results: list[dict[str, Any]], s: Setting) -> dict[tuple[str, str], tuple[float, float, int]]:
    return {k: (*mean_std([100 * r["test_acc"] for r in v]), len(v)) for k, v in main_table(results, s).items()}


def markdown_before_after(before: list[dict[str, Any]], after: list[dict[str, Any]], s: Setting) -> str:
    """Full FT vs BitFit per task, before (old protocol) and after (the recipe with ``--cls-init off``, and the
    defaults, ``--cls-init auto``, where the suite has them): test %, mean ± std, gap to full FT."""
    b, a = _cell_stats(before, s), _cell_stats(after, s)
    # (stats, BitFit method, column label, with a full-FT column): the defaults share the "after" full FT
    groups = [(b, "bitfit", "before", True), (a, "bitfit", "after", True)]
    if any(k[1] == AUTO_METHOD for k in a):
        groups.append((a, AUTO_METHOD, "defaults after", False))
    head = ["task"]
    for *_, label, with_full in groups:
        head += ([f"Full FT {label}"] if with_full else []) + [f"BitFit {label}", "gap" + (f" {label}" * with_full)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    gaps: list[list[float]] = [[] for _ in groups]
    for t in s.tasks:
        row = [t]
        for (st, method, _, with_full), task_gaps in zip(groups, gaps, strict=True):
            f, bf = st.get((t, "full")), st.get((t, method))
            if with_full:
                row.append(f"{f[0]:.1f} ± {f[1]:.1f}" if f else "–")
            row.append(f"{bf[0]:.1f} ± {bf[1]:.1f}" if bf else "–")
            if f and bf:
                task_gaps.append(bf[0] - f[0])
            row.append(f"{bf[0] - f[0]:+.1f}" if f and bf else "–")
        lines.append("| " + " | ".join(row) + " |")
    means = [f"{statistics.fmean(v):+.1f}" if len(v) == len(s.tasks) else "–" for v in gaps]
    lines.append("| mean gap |" + "".join(" |" * (1 + with_full) + f" {m} |"
                                          for (*_, with_full), m in zip(groups, means, strict=True)))  # fmt: skip
    return "\n".join(lines)


def markdown_wall(results: list[dict[str, Any]], s: Setting) -> str:
    """Steps, training seconds per run (mean over the seeded runs) and test accuracy, per task and method."""
    cells = main_table(results, s)
    methods = [m for m in s.methods if any(k[1] == m for k in cells)]
    lines = ["| task | " + " | ".join(f"{METHOD_LABELS[m]}: steps, s/run, test %" for m in methods)
             + " | BitFit / Full FT wall |", "|---" * (len(methods) + 2) + "|"]  # fmt: skip
    ratios = []
    for t in s.tasks:
        row, secs = [t], {}
        for m in methods:
            runs = cells.get((t, m), [])
            if not runs:
                row.append("–")
                continue
            sec = statistics.fmean(r.get("train_seconds") or r["seconds"] for r in runs)
            secs[m] = sec
            steps = statistics.fmean(r["steps"] for r in runs)
            mu, sd = mean_std([100 * r["test_acc"] for r in runs])
            row.append(f"{steps:.0f}, {sec:.0f} s, {mu:.1f} ± {sd:.1f}")
        ratio = secs["bitfit"] / secs["full"] if "bitfit" in secs and "full" in secs else None
        if ratio is not None:
            ratios.append(ratio)
        row.append(f"{ratio:.2f}x" if ratio is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    if ratios:
        lines.append("| mean | " + " | " * len(methods) + f"{statistics.fmean(ratios):.2f}x |")
    return "\n".join(lines)


def sweep_points(results: list[dict[str, Any]], s: Setting) -> dict[tuple[str, str], dict[int, list[float]]]:
    """{(task, method): {n_train: [test accs]}}; main-table runs count as the ``train_cap`` point."""
    pts: dict[tuple[str, str], dict[int, list[float]]] = {}
    cells = _seeded(results, "") | _seeded(results, "sweep_")
    graded = {(x["task"], x["method"], x.get("size")) for x in results if x["phase"] == "sweep_selected"}
    # sweep runs at an LR reused from the main table (no per-size grid) have no "sweep_selected" record
    reused = [
        r for r in results if r["phase"] == "sweep_seed" and (r["task"], r["method"], r.get("size")) not in graded
    ]
    for runs in list(cells.values()) + [[r] for r in reused]:
        for r in runs:
            if r["task"] in s.sweep_tasks and r["method"] in s.sweep_methods:
                by_n = pts.setdefault((r["task"], r["method"]), {})
                by_n.setdefault(r["n_train"], []).append(100 * r["test_acc"])
    for (t, n), on in auto_decisions(s).items():  # the defaults: the probe's pick at each training-set size
        picked = pts.get((t, CLS_METHOD if on else "bitfit"), {}).get(n)
        if t in s.sweep_tasks and CLS_METHOD in s.sweep_methods and picked:
            pts.setdefault((t, AUTO_METHOD), {})[n] = picked
    return pts


def markdown_sweep(results: list[dict[str, Any]], s: Setting) -> str:
    pts = sweep_points(results, s)
    sizes = sorted({n for d in pts.values() for n in d})
    lines = ["| task | method | " + " | ".join(f"n={n}" for n in sizes) + " |"]
    lines.append("|---" * (len(sizes) + 2) + "|")
    methods = _with_auto(s.sweep_methods, pts)
    for t in s.sweep_tasks:
        for m in methods:
            d = pts.get((t, m), {})
            cells = []
            for n in sizes:
                mu, sd = mean_std(d.get(n, []))
                cells.append(f"{mu:.1f} ± {sd:.1f}" if d.get(n) else "–")
            lines.append(f"| {t} | {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
        for m in (m for m in ("bitfit", AUTO_METHOD) if m in methods and "full" in methods):
            gaps = []
            for n in sizes:
                a, b = pts.get((t, m), {}).get(n), pts.get((t, "full"), {}).get(n)
                gaps.append(f"{statistics.fmean(a) - statistics.fmean(b):+.1f}" if a and b else "–")
            lines.append(f"| {t} | {METHOD_LABELS[m]} − Full FT | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def plot_main(results: list[dict[str, Any]], s: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = main_table(results, s)
    tasks = [t for t in s.tasks if any(k[0] == t for k in cells)]
    methods = [m for m in s.methods if any(k[1] == m for k in cells)]
    fig, ax = plt.subplots(figsize=(1.9 * len(tasks) + 3.5, 3.6))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        mus, sds = [], []
        for t in tasks:
            mu, sd = mean_std([100 * r["test_acc"] for r in cells.get((t, m), [])])
            mus.append(mu)
            sds.append(sd)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, mus, width, yerr=sds, capsize=2, label=METHOD_LABELS[m], color=METHOD_COLORS[m])
    lo = min((100 * r["test_acc"] for rs in cells.values() for r in rs), default=0)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MiniLM-L6, {s.name} setting: mean ± std over {s.seeds} seeds", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(results: list[dict[str, Any]], s: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep_points(results, s)
    fig, axes = plt.subplots(1, len(s.sweep_tasks), figsize=(4.2 * len(s.sweep_tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], s.sweep_tasks, strict=True):
        for m in s.sweep_methods:
            d = pts.get((t, m), {})
            ns = sorted(d)
            if not ns:
                continue
            stats = [mean_std(d[n]) for n in ns]
            ax.errorbar(ns, [a for a, _ in stats], yerr=[b for _, b in stats], marker="o", capsize=3,
                        label=METHOD_LABELS[m], color=METHOD_COLORS[m])  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training examples")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"BitFit vs full fine-tuning by training-set size ({s.name} setting)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish(body: str, doc: Path | None, section: str) -> None:
    """Print ``body`` and, with ``doc``, write it between that page's ``results:<section>`` markers."""
    print(body)
    if doc:
        write_doc_section(doc, section, body)


def write_doc_section(doc: Path, setting: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- results:<setting>:start/end -->`` markers."""
    start, end = f"<!-- results:{setting}:start -->", f"<!-- results:{setting}:end -->"
    text = doc.read_text() if doc.exists() else "# Accuracy\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def report(
    results: list[dict[str, Any]],
    s: Setting,
    doc: Path,
    img_dir: Path,
    wall: float | None,
    stopped: str | None = None,
    platform: str | None = None,
) -> str:
    """Markdown results (also written into ``doc``) + PNG plots into ``img_dir``."""
    main_png = img_dir / f"acc_main_{s.name}.png"
    sweep_png = img_dir / f"acc_sweep_{s.name}.png"
    before_path = REPO / "benchmarks" / "accuracy" / "results" / BEFORE_RUNS
    before = load_results(before_path) if s.recipe_methods and s.name == "reduced" else []
    if before and s.seeds_override.get("full", s.seeds) < s.seeds:  # full FT's other seeds: the run before
        lrs = {r["lr"] for r in results if r["method"] == "full" and r["phase"] == "selected"}
        results = results + [r for r in before if r["method"] == "full" and r["phase"] == "seed" and r["lr"] in lrs]
    sweep_s, sweep_results = s, results
    if before and "full" not in s.sweep_methods:  # full FT sweep points from the run before (same protocol)
        sweep_s = replace(s, sweep_methods=(*s.sweep_methods, "full"))
        sweep_results = results + [r for r in before if r["method"] == "full" and r["phase"] == "sweep_seed"]
    plot_main(results, s, main_png)
    plot_sweep(sweep_results, sweep_s, sweep_png)
    rel = os.path.relpath(img_dir, doc.parent)
    n_runs = sum(r["phase"] in ("grid", "seed", "sweep_grid", "sweep_seed") for r in results)
    dev = platform or platform_line()
    timing = f"{n_runs} training runs, wall time {wall / 60:.1f} min" if wall else f"{n_runs} training runs"
    if stopped:
        timing += f" (**incomplete**: {stopped})"
    body = "\n".join(
        [
            f"**Setting `{s.name}`** — {s.notes}. {timing}; {dev}.",
            "",
            "Test accuracy (%), mean ± std over seeds at the learning rate selected on dev (seed 0):",
            "",
            markdown_main(results, s),
            "",
            f"![main results]({rel}/{main_png.name})",
            "",
            "Data-size sweep (test accuracy %, mean ± std over seeds):",
            "",
            markdown_sweep(sweep_results, sweep_s),
            "",
            f"![data-size sweep]({rel}/{sweep_png.name})",
        ]
    )
    if before:
        body += "\n\n" + "\n".join(
            [
                "Before / after (test %, mean ± std over seeds; gap = BitFit − Full FT, points). *Before*: the "
                f"suite's first protocol (`results/{BEFORE_RUNS}`: BitFit 50 steps, one LR for biases and head, "
                "LR grid {3e-3, 1e-2}; full FT grid {5e-5, 1.5e-4}). *After*: this run.",
                "",
                markdown_before_after(before, results, s),
                "",
                "Steps, training time per run (dev evaluations during training included) and test accuracy; "
                "LoRA and BEFT get BitFit's measured wall time per run (equal-wall-time comparison):",
                "",
                markdown_wall(results, s),
            ]
        )
    write_doc_section(doc, s.name, body)
    return body


def platform_line() -> str:
    if torch.cuda.is_available():
        return f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
