"""What ``bitfit-peft train`` prints around the Trainer: the plan before training, one table row per epoch, and a
loud warning when the result does not beat the majority class.

Example:
    >>> from rich.console import Console
    >>> from bitfit_peft.training.plan import EpochRow
    >>> table = EpochTable(Console(width=80, force_terminal=False), "accuracy")
    >>> table(EpochRow(0.0, None, {"accuracy": 0.5, "loss": 0.69}))  # doctest: +NORMALIZE_WHITESPACE
      epoch   train loss   dev loss   dev accuracy
          0            -     0.6900         0.5000
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from bitfit_peft.training.plan import EpochRow, TrainPlan

_WIDTH = 12


def print_plan(plan: TrainPlan, console: Console) -> None:
    """The run as it is about to start: split sizes, labels found, steps, precision, the ``[CLS]``-init decision."""
    table = Table(title="Plan", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("examples (train / dev)", f"{plan.num_train:,} / {plan.num_dev:,}")
    if plan.labels:
        shown = ", ".join(f"{escape(name)} ({n:,})" for name, n in list(plan.labels.items())[:12])
        more = f", ... ({len(plan.labels)} in all)" if len(plan.labels) > 12 else ""
        table.add_row(f"labels found ({len(plan.labels)})", shown + more)
    if plan.majority_accuracy is not None:
        table.add_row("majority-class dev accuracy", f"{plan.majority_accuracy:.4f} (the result must beat it)")
    table.add_row("batch", f"{plan.effective_batch_size} examples per optimizer step ({plan.precision})")
    table.add_row("steps", f"{plan.steps_per_epoch:,} per epoch x {plan.num_epochs:g} epochs = {plan.total_steps:,}")
    table.add_row("[CLS] init", escape(plan.cls_init))
    console.print(table)


class EpochTable:
    """Prints :class:`EpochRow` s as one table, a line per epoch (header with the first row): the function an
    :class:`~bitfit_peft.training.plan.EpochLog` calls."""

    def __init__(self, console: Console, metric: str) -> None:
        self.console = console
        self.columns = [m for m in dict.fromkeys(["loss", metric]) if m]
        self._first = True

    def __call__(self, row: EpochRow) -> None:
        table = Table(box=None, show_header=self._first, pad_edge=False, padding=(0, 1))
        for title in ["epoch", "train loss", *(f"dev {m}" for m in self.columns)]:
            table.add_column(title, justify="right", min_width=5 if title == "epoch" else _WIDTH - 2)
        values = [row.metrics.get(m) for m in self.columns]
        table.add_row(f"{row.epoch:g}", _fmt(row.train_loss), *(_fmt(v) for v in values))
        self._first = False
        self.console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def warn_if_no_better_than_majority(result: Any, console: Console) -> bool:
    """A loud warning when the final dev accuracy does not beat always predicting the majority class; True if so."""
    if result.beats_majority is not False:
        return False
    console.print(Panel(
        f"Dev accuracy {result.accuracy_after:.4f} does not beat always predicting the majority class "
        f"({result.majority_accuracy:.4f}): this adapter has learned nothing useful. Try more epochs (--epochs), "
        "--lr auto, more training data, or check that --label-column holds the labels.",
        title="WARNING: no better than the majority class", style="bold red",
    ))  # fmt: skip
    return True
