"""What a :func:`~bitfit_peft.training.train` run will do, known before it trains (:class:`TrainPlan`), and what each
epoch did (:class:`EpochLog`, a Trainer callback that hands one :class:`EpochRow` per evaluation to a function).

``bitfit-peft train`` prints the plan before the first step and the rows as a table (:mod:`bitfit_peft.cli.epochs`);
the API returns the plan in ``result.extra["plan"]`` and takes ``on_plan=`` / ``callbacks=[EpochLog(show)]``.

Example:
    >>> cls_init_decision(False, "seq-cls", {})
    'off: --cls-init off'
    >>> steps_per_epoch(num_train=1000, batch_size=32, world_size=1, accumulation=2)
    16
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from bitfit_peft.training.metrics import clean_metrics


@dataclass
class TrainPlan:
    """The run as it is about to start."""

    task: str
    num_train: int
    num_dev: int
    labels: dict[str, int] | None  #: label name -> training examples (classification)
    effective_batch_size: int  #: per device x devices x gradient accumulation
    steps_per_epoch: int
    num_epochs: float
    cls_init: str  #: "on: <reason>" / "off: <reason>"
    majority_accuracy: float | None = None
    precision: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return math.ceil(self.steps_per_epoch * self.num_epochs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_steps": self.total_steps}


@dataclass
class EpochRow:
    """One evaluation of the run: epoch (0: before training), mean training loss since the last row, dev metrics."""

    epoch: float
    train_loss: float | None
    metrics: dict[str, float]
    learning_rate: float | None = None


def steps_per_epoch(num_train: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """Optimizer steps per epoch (the last, partial batch counts, as in Trainer)."""
    batches = math.ceil(num_train / (batch_size * max(world_size, 1)))
    return max(math.ceil(batches / accumulation), 1)


def cls_init_decision(setting: bool | str, task: str, extra: dict[str, Any]) -> str:
    """One line: whether the ``[CLS]`` attention init is on, and why."""
    if setting is False:
        return "off: --cls-init off"
    if setting is True:
        return "on: --cls-init on"
    probe = extra.get("cls_probe")
    if not probe:
        return f"off: auto applies to seq-cls only, not {task}"
    decision = "on" if probe["enable"] else "off"
    if "reason" in probe:
        return f"{decision}: {probe['reason']}"
    return (f"{decision}: linear probe of the first token {probe['first_token']:.1f}%, mean-pooled "
            f"{probe['mean_pooled']:.1f}% on {probe['num_dev']} dev examples (on above a {probe['min_gap']:g}-point "
            f"gap, from {probe['min_dev']} dev examples)")  # fmt: skip


def make_plan(args: Any, task_data: Any, trainer: Any, extra: dict[str, Any]) -> TrainPlan:
    """The :class:`TrainPlan` of a run whose trainer is built and adapter initialised (``extra``: what that did)."""
    targs = trainer.args
    counts = Counter(ex["label"] for ex in task_data.train) if args.task == "seq-cls" else None
    names = task_data.label_names or []
    labels = {(names[k] if isinstance(k, int) and k < len(names) else str(k)): n for k, n in sorted(counts.items())} \
        if counts else ({name: 0 for name in names} or None)  # fmt: skip
    if args.task == "token-cls" and names:
        tags = Counter(t for ex in task_data.train for t in ex.get("labels", ()))
        labels = {name: tags.get(i, 0) for i, name in enumerate(names)}
    per_step = targs.per_device_train_batch_size * max(targs.world_size, 1) * targs.gradient_accumulation_steps
    precision = "bfloat16 mixed" if targs.bf16 else "float16 mixed" if targs.fp16 else "float32"
    return TrainPlan(
        task=args.task,
        num_train=len(trainer.train_dataset),
        num_dev=len(trainer.eval_dataset),
        labels=labels,
        effective_batch_size=per_step,
        steps_per_epoch=steps_per_epoch(len(trainer.train_dataset), targs.per_device_train_batch_size,
                                        targs.world_size, targs.gradient_accumulation_steps),  # fmt: skip
        num_epochs=float(targs.num_train_epochs),
        cls_init=cls_init_decision(args.cls_attention_init, args.task, extra),
        majority_accuracy=task_data.majority_accuracy(),
        precision=precision,
    )


class EpochLog(TrainerCallback):
    """Records one :class:`EpochRow` per dev evaluation of the run (``rows``) and passes each to ``show``.

    :func:`~bitfit_peft.training.train.build_trainer` drops the Trainer's own printing of raw log dicts when one is
    among the callbacks (the progress bars stay).
    """

    def __init__(self, show: Callable[[EpochRow], None] | None = None) -> None:
        self.show = show
        self.rows: list[EpochRow] = []
        self._losses: list[float] = []
        self._lr: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self._losses.append(float(logs["loss"]))
        if "learning_rate" in logs:
            self._lr = float(logs["learning_rate"])

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:  # fmt: skip
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        row = EpochRow(float(state.epoch or 0.0), loss, clean_metrics(metrics or {}), self._lr)
        self._losses = []
        if self.rows and row.epoch == self.rows[-1].epoch:  # the final evaluation of the kept epoch: not a new row
            return
        self.rows.append(row)
        if self.show is not None:
            self.show(row)


class _BarsOnly(ProgressCallback):
    """Trainer's training progress bar, without its printed log dicts and the evaluation bar between table rows."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        return None

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None,
                           **kwargs: Any) -> None:  # fmt: skip
        return None


def quiet_log_printing(trainer: Any) -> None:
    """Keep ``trainer``'s progress bars but not its printed log dicts (an :class:`EpochLog` shows them as rows)."""
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarsOnly)
