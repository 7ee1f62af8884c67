"""Reward curves (PNG) and the results table (markdown) of ``benchmarks.grpo.run``'s JSON files.

Example:
    $ python -m benchmarks.grpo.report benchmarks/results/grpo --png docs/img/grpo_rewards.png \\
          --markdown benchmarks/results/grpo.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"bitfit": "BitFit (bias only)", "lora": "LoRA r8", "full": "Full fine-tuning"}
ORDER = ("bitfit", "lora", "full")


def load(folder: Path) -> list[dict]:
    """The runs in ``folder`` (``<method>.json``), in the order BitFit, LoRA, full."""
    runs = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    return [runs[m] for m in ORDER if m in runs]


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average over ``window`` steps."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]  # fmt: skip


def plot(runs: list[dict], png: Path) -> None:
    """Per-step training reward (thin) and its 5-step moving average (thick), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, colour in zip(runs, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        steps = [p["step"] for p in run["curve"]]
        rewards = [p["reward"] for p in run["curve"]]
        ax.plot(steps, rewards, color=colour, alpha=0.3, linewidth=1)
        ax.plot(steps, smooth(rewards), color=colour, linewidth=2.2, label=f"{NAMES[run['method']]} (5-step mean)")
    if runs and runs[0].get("held_out_before") is not None:
        base = runs[0]["held_out_before"]
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model, held-out pairs (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_ylim(-0.02, 1.02)
    first = runs[0] if runs else {}
    ax.set_title(
        f"GRPO on SmolLM2-135M-Instruct, single-digit sums (group {first.get('generations')}, "
        f"{first.get('batch')} samples/step)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def table(runs: list[dict]) -> str:
    """The markdown results table."""
    rows = [
        "| method | learning rate | trainable parameters | held-out reward before | held-out reward after "
        "| training reward, first 5 steps | training reward, last 5 steps | training time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rewards = [p["reward"] for p in run["curve"]]
        first, last = rewards[:5], rewards[-5:]
        rows.append(
            f"| {NAMES[run['method']]} | {run['learning_rate']:g} | {run['trainable_params']:,} "
            f"| {run['held_out_before']:.3f} | **{run['held_out_after']:.3f}** | {sum(first) / len(first):.3f} "
            f"| {sum(last) / len(last):.3f} | {run['train_seconds']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--png", type=Path, default=Path("docs/img/grpo_rewards.png"))
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    runs = load(args.folder)
    plot(runs, args.png)
    text = table(runs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
