"""``learning_rate="auto"``: a short learning-rate range test on the training data, chosen by dev loss.

Each learning rate of a small grid trains the *same* initial adapter (same head initialisation and data order)
for a few steps at a constant learning rate after a short warm-up; the one with the lowest dev loss wins and
the adapter is reset to its initial values before the real run. The cost is ``len(grid) * probe_steps`` training
steps plus one dev evaluation per candidate (on at most ``max_eval`` dev examples).

Example:
    >>> from bitfit_peft.training.lr_finder import check_grid
    >>> check_grid([1e-3, 1e-2])
    (0.001, 0.01)
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch / transformers load lazily: the CLI imports this module for its defaults
    from transformers import Trainer

#: Candidates of ``learning_rate="auto"`` (bias deltas; the head trains at ``head_lr_factor`` times each).
AUTO_LR_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
#: Probe length: half an epoch, clamped to this range of optimizer steps.
PROBE_STEPS_RANGE: tuple[int, int] = (10, 60)


@dataclass
class LRSearchResult:
    """Outcome of :func:`find_learning_rate`: the chosen rate and the dev loss of every candidate."""

    learning_rate: float
    dev_loss: dict[float, float] = field(default_factory=dict)
    probe_steps: int = 0
    seconds: float = 0.0


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """Validate a learning-rate grid: a non-empty sequence of positive, finite numbers (returned sorted)."""
    values = tuple(grid)
    if not values:
        raise ValueError("the auto learning-rate grid is empty; pass at least one rate, e.g. 1e-3,1e-2")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"auto learning-rate grid value {v!r} is not a positive number; use e.g. 1e-3,1e-2")
    return tuple(sorted(float(v) for v in values))


def probe_steps_for(num_train: int, batch_size: int) -> int:
    """Default probe length: half an epoch of ``num_train`` examples, clamped to :data:`PROBE_STEPS_RANGE`."""
    lo, hi = PROBE_STEPS_RANGE
    return max(lo, min(hi, math.ceil(0.5 * num_train / max(1, batch_size))))


def find_learning_rate(
    trainer: Trainer,
    grid: Sequence[float] = AUTO_LR_GRID,
    *,
    probe_steps: int,
    head_lr_factor: float,
    seed: int,
    max_eval: int = 512,
) -> LRSearchResult:
    """Range-test ``grid`` with copies of ``trainer`` (same model, data, collator); returns the lowest dev loss.

    The trainable parameters are restored to their values at entry after every probe, so the caller's
    ``trainer`` trains from the same initial adapter afterwards. Ties go to the smaller rate.
    """
    import torch
    from transformers import set_seed

    values = check_grid(grid)
    if probe_steps < 1:
        raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
    if trainer.eval_dataset is None:
        raise ValueError("learning_rate='auto' needs a dev set to choose by dev loss; pass dev data")
    model = trainer.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dev = trainer.eval_dataset
    if len(dev) > max_eval:
        dev = torch.utils.data.Subset(dev, range(max_eval))
    start = time.perf_counter()
    losses: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="bitfit-lr-auto-") as tmp:
        for lr in values:
            args = dataclasses.replace(
                trainer.args, output_dir=tmp, learning_rate=lr, max_steps=probe_steps, lr_scheduler_type=
                "constant_with_warmup", warmup_steps=0.1, eval_strategy="no", save_strategy="no",
                logging_strategy="no", load_best_model_at_end=False, push_to_hub=False, disable_tqdm=True,
            )  # fmt: skip
            set_seed(seed)
            probe = type(trainer)(
                model=model, args=args, train_dataset=trainer.train_dataset, data_collator=trainer.data_collator,
                processing_class=trainer.processing_class, **_extra(trainer, lr * head_lr_factor),
            )  # fmt: skip
            _silence(probe)
            probe.train()
            loss = float(probe.evaluate(dev)["eval_loss"])
            losses[lr] = loss if math.isfinite(loss) else math.inf
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in initial:
                        p.copy_(initial[n])
    best = min(values, key=lambda v: (losses[v], v))
    return LRSearchResult(best, losses, probe_steps, time.perf_counter() - start)


def _extra(trainer: Trainer, head_lr: float) -> dict[str, Any]:
    """Constructor arguments of ``trainer``'s class beyond Trainer's (the head learning rate of BitFitTrainer)."""
    return {"head_learning_rate": head_lr} if hasattr(trainer, "head_learning_rate") else {}


def _silence(trainer: Trainer) -> None:
    """Drop the progress bar and log printer of a probe trainer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
