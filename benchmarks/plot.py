"""Turn benchmark JSON outputs into PNG plots (docs/img/bench_*.png) and docs/benchmarks.md.

Each results directory holds any of ``train_speed.json``, ``mixed_batch.json``, ``mixed_batch_bertbase.json`` /
``mixed_batch_qwen05b.json`` (``mixed_batch.py --shape bertbase|qwen05b``), ``adapter_io.json`` from one machine
(e.g. ``benchmarks/results/cpu``
from a local run, ``benchmarks/results/gpu`` copied from the ``$OUT`` of ``benchmarks/gpu_all.sh``). Every
directory becomes one section of the markdown page.

Usage::

    python benchmarks/plot.py                                   # default result dirs that exist
    python benchmarks/plot.py --results out/ --md docs/benchmarks.md --img-dir docs/img
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plot_tables import MODE_LABELS, fmt, md_io, md_mixed, md_train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = [REPO / "benchmarks" / "results" / "gpu", REPO / "benchmarks" / "results" / "cpu"]
def load_dir(d: Path) -> dict[str, Any]:
    """All known JSON results in ``d`` keyed by benchmark name."""
    out = {}
    for name in ("train_speed", "mixed_batch", "mixed_batch_bertbase", "mixed_batch_qwen05b", "adapter_io"):
        p = d / f"{name}.json"
        if p.exists():
            out[name] = json.loads(p.read_text())
    return out


def tag_of(res: dict[str, Any]) -> str:
    env = next(iter(res.values()))["env"]
    return "gpu" if env.get("device_type") == "cuda" else "cpu"


def env_line(env: dict[str, Any]) -> str:
    return (
        f"{env.get('device')} · torch {env.get('torch')} · transformers {env.get('transformers')} · "
        f"peft {env.get('peft')} · bitfit-peft {env.get('bitfit_peft')} · torch threads {env.get('threads')} · "
        f"{env.get('date')}"
    )


# --------------------------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _suptitle(fig: Any, title: str, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width, so that no part of it falls outside the image."""
    width_in = fig.get_size_inches()[0]
    chars = max(30, int(width_in * 72 / (0.55 * fontsize)))  # ~0.55 em per character of the default sans font
    fig.suptitle("\n".join(textwrap.wrap(title, chars)), fontsize=fontsize)


def _headroom(ax: Any, factor: float = 1.12) -> None:
    """Room above the tallest bar for its value label (linear or log y axis)."""
    bottom, top = ax.get_ylim()
    if ax.get_yscale() == "log":
        ax.set_ylim(bottom, top * factor**4)
    else:
        ax.set_ylim(bottom, bottom + (top - bottom) * factor)


def _save(fig: Any, path: Path) -> None:
    """Lay out and save with a tight bounding box: titles, tick labels and legends stay inside the PNG."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def plot_train(ts: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    models = [m for m, r in ts["results"].items() if "modes" in r]
    modes = ts["env"].get("modes") or list(MODE_LABELS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(models))
    for ax, key, label in (
        (axes[0], "time_ratio", "step time / full FT"),
        (axes[1], "mem_ratio", "peak memory / full FT"),
    ):
        for i, m in enumerate(models):
            vals = [ts["results"][m]["modes"].get(mode, {}).get(key, float("nan")) for mode in modes]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(modes))]
            bars = ax.bar(xs, vals, width, label=m)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in vals], fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(
            [MODE_LABELS.get(m, m).replace(" (", "\n(") for m in modes], fontsize=7, rotation=25, ha="right"
        )
        ax.set_ylabel(label)
        _headroom(ax)
        ax.legend(fontsize=8)
    _suptitle(fig, title)
    _save(fig, path)


def mixed_panels(mbs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(part, result) of every mixed-batch part with timings, over the given mixed_batch JSONs."""
    return [
        (part, mb["results"][part])
        for mb in mbs
        for part in ("forward", "generate")
        if mb["results"].get(part, {}).get("patterns")
    ]


def plot_mixed(mbs: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _plt()
    panels = mixed_panels(mbs)
    if not panels:
        return
    # at most two panels per row; a panel is wide enough for its bars' three-line labels (0.75 in per bar)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    col_w = [
        max([5.5] + [0.75 * len(r["patterns"]) for k, (_, r) in enumerate(panels) if k % ncols == c])
        for c in range(ncols)
    ]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(sum(col_w), 4.4 * nrows), squeeze=False, gridspec_kw={"width_ratios": col_w}
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (part, r) in zip(axes.flat, panels, strict=False):
        pats = r["patterns"]
        names = list(pats)
        vals = [pats[n]["ratio"] for n in names]
        colors = ["#888" if n.startswith("base") else "#1f77b4" if n.startswith("bitfit") else "#ff7f0e" for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        for bar, n in zip(bars, names, strict=True):
            if "_compiled" in n:
                bar.set_hatch("//")
                bar.set_edgecolor("white")
        labels = [
            f"{v:.2f}\n({pats[n]['ratio_compiled']:.2f})" if "ratio_compiled" in pats[n] else f"{v:.2f}"
            for n, v in zip(names, vals, strict=True)
        ]
        ax.bar_label(bars, labels=labels, fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7 if len(names) > 6 else 8)
        ax.set_ylabel("time / eager base model")
        spec = r["spec"]
        extra = f", {r.get('new_tokens')} new tokens" if part == "generate" else ""
        ax.set_title(f"{part}: {spec['name']} bs{spec['batch']}x{spec['seq']}{extra}", fontsize=9)
        _headroom(ax, 1.15)
    if any("_compiled" in n for _, r in panels for n in r["patterns"]):
        title += "; hatched bars: torch.compile, value in brackets: × base_compiled"
    _suptitle(fig, title)
    _save(fig, path)


def plot_io(aio: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    res = {k: v for k, v in aio["results"].items() if "error" not in v}
    if not res:
        return
    kinds = list(res)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("load_adapter_ms", "load_adapter (ms)", aio["targets_ms"]["load_adapter"]),
        ("set_adapter_ms", "set_adapter (ms)", aio["targets_ms"]["set_adapter"]),
        (None, "adapter file (KiB)", None),
    ]
    for ax, (key, label, target) in zip(axes, panels, strict=True):
        if key is None:
            names, vals = [], []
            for k in kinds:
                for dt, b in res[k]["file_bytes"].items():
                    names.append(f"{k}\n{dt}")
                    vals.append(b / 1024)
        else:
            names, vals = [], []
            for k in kinds:
                names.append(f"{k}\nfew resident")
                vals.append(res[k][key])
                if f"{key}_many" in res[k]:
                    names.append(f"{k}\n{res[k].get('resident', 'many')} resident")
                    vals.append(res[k][f"{key}_many"])
        bars = ax.bar(range(len(names)), vals, color=["#1f77b4" if "bitfit" in n else "#ff7f0e" for n in names])
        ax.bar_label(bars, labels=[fmt(v) for v in vals], fontsize=7)
        if target:
            ax.axhline(target, color="red", lw=0.8, ls="--", label=f"target {target} ms")
            ax.legend(fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(label, fontsize=9)
        _headroom(ax)
    _suptitle(fig, title)
    _save(fig, path)


# --------------------------------------------------------------------------------------------- markdown


HEADER = """# Benchmarks

Generated by `benchmarks/plot.py` from the JSON written by the benchmark scripts; do not edit by hand
(edit the template in `benchmarks/plot.py`).

What is measured (all numbers are ratios against a baseline measured **in the same process and run**):

- **Training step** (`benchmarks/train_speed.py`): forward + backward + AdamW (fused) step on randomly
  initialised models built from configs. Modes: full fine-tuning, naive bias-freezing (`requires_grad` only on
  biases + classifier head), PEFT LoRA r8 all-linear, PEFT BEFT all-linear, bitfit-peft default
  (`get_peft_model(model, BitFitConfig(task_type=...))`) and bitfit-peft low-memory mode
  (`bitfit_peft.cast_frozen_base(model, torch.bfloat16)`, deltas fp32). Step time: interleaved round-robin
  rounds over all modes held in one process, median seconds per step. Peak memory: one mode at a time
  (CUDA: `max_memory_allocated` delta; CPU: fresh subprocess per mode, peak RSS delta).
- **Mixed-task batch** (`benchmarks/mixed_batch.py`): 8 adapters, one task per sample
  (`model(**batch, adapter_names=[...])`) vs the plain base model, one active adapter, and a per-task split
  (`set_adapter` + sub-batch forward per task); PEFT LoRA r8 with 8 adapters for comparison. With `--compile`
  also `torch.compile(base)` vs `peft_model.get_base_model().compile()` (one adapter and mixed; `*_compiled`,
  hatched bars). `--shape bertbase` is the forward at BERT-base dims (on CPU batch 16 x 128) and `--shape qwen05b`
  adds `generate` at the Qwen2-0.5B shape, batch 16 (single CPU data points at these full-size shapes).
- **Adapter I/O** (`benchmarks/adapter_io.py`): `PeftModel.load_adapter` / `from_pretrained` of a BERT-base
  adapter from local disk, `set_adapter` switch time, saved file size (fp32 and `save_dtype` bf16/fp16).

Reproduce: `python benchmarks/train_speed.py`, `python benchmarks/mixed_batch.py`,
`python benchmarks/adapter_io.py` (CPU shapes; add `--gpu --json ...` for GPU shapes), or on a GPU machine
`OUT=out bash benchmarks/gpu_all.sh` (≤ 8 min), then `python benchmarks/plot.py --results out`.
"""


def section(res: dict[str, Any], tag: str, img_dir: Path, md_path: Path) -> str:
    env = next(iter(res.values()))["env"]
    title = "GPU" if tag == "gpu" else "CPU"
    rel = os.path.relpath(img_dir, md_path.parent)
    parts = [f"## {title} results\n", f"{env_line(env)}\n"]
    if tag == "cpu":
        parts.append(
            "> CPU numbers use small shapes and a shared 2-core machine: treat ratios as indicative only;"
            " the GPU section is the reference.\n"
        )
    if "train_speed" in res:
        p = img_dir / f"bench_train_speed_{tag}.png"
        plot_train(res["train_speed"], p, f"Training step vs full FT ({env.get('device')})")
        parts += [
            "### Training step time and peak memory\n",
            md_train(res["train_speed"]),
            f"\n![training step ratios]({rel}/{p.name})\n",
        ]
    mbs = [res[k] for k in ("mixed_batch", "mixed_batch_bertbase", "mixed_batch_qwen05b") if k in res]
    if mbs:
        p = img_dir / f"bench_mixed_batch_{tag}.png"
        plot_mixed(mbs, p, f"Mixed 8-task batch vs base model ({env.get('device')})")
        parts.append("### Mixed-task batches\n")
        if "mixed_batch" in res:
            parts.append(md_mixed(res["mixed_batch"]))
        if "mixed_batch_bertbase" in res:
            parts.append("\n" + md_mixed(res["mixed_batch_bertbase"], label="BERT-base shape, "))
        if "mixed_batch_qwen05b" in res:
            parts.append("\n" + md_mixed(res["mixed_batch_qwen05b"], label="Qwen2-0.5B shape, "))
        parts.append(f"\n![mixed batch ratios]({rel}/{p.name})\n")
    if "adapter_io" in res:
        p = img_dir / f"bench_adapter_io_{tag}.png"
        plot_io(res["adapter_io"], p, f"Adapter I/O ({env.get('device')})")
        parts += ["### Adapter load / switch / size\n", md_io(res["adapter_io"]), f"\n![adapter io]({rel}/{p.name})\n"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", type=Path, default=None, help="result dirs (one per machine)")
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument(
        "--notes",
        type=Path,
        default=REPO / "benchmarks" / "results" / "NOTES.md",
        help="optional hand-written findings appended to the page",
    )
    args = ap.parse_args(argv)
    dirs = args.results or [d for d in DEFAULT_RESULTS if d.exists()]
    args.img_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    seen: set[str] = set()
    for d in dirs:
        res = load_dir(d)
        if not res:
            print(f"no results in {d}")
            continue
        tag = tag_of(res)
        if tag in seen:  # second dir of the same device type: suffix the image names
            tag = f"{tag}_{re.sub(r'[^A-Za-z0-9]+', '_', d.name)}"
        seen.add(tag)
        sections.append(section(res, tag, args.img_dir, args.md))
        print(f"{d}: {sorted(res)} -> {tag}")
    text = HEADER + "\n" + "\n".join(sections)
    if args.notes and args.notes.exists():
        text += "\n" + args.notes.read_text()
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(text.rstrip() + "\n")
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
