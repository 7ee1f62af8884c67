"""BitFit's default training recipe: the values :func:`bitfit_peft.training.train` and ``bitfit-peft train`` use.

Bias-only training needs larger learning rates and more steps than full fine-tuning; a fresh task head needs a
larger learning rate still. The values of :data:`RECIPE` were selected on **dev** data of the accuracy suite
(``benchmarks/accuracy``, MiniLM-L6, four tasks; evidence in ``docs/accuracy.md``, "The default recipe").
Dev is evaluated every epoch, but the model of the *last* epoch is kept: with the linear decay to zero it is the
converged one, and on 200-example dev sets the best epoch's extra dev points were selection noise (round 6).

Example:
    >>> from bitfit_peft.training.recipe import RECIPE
    >>> RECIPE.head_learning_rate(RECIPE.learning_rate) == RECIPE.learning_rate * RECIPE.head_lr_factor
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitfit_peft.training.lr_finder import check_grid


@dataclass(frozen=True)
class Recipe:
    """One BitFit schedule: optimiser and schedule settings, early stopping on dev."""

    learning_rate: float  #: bias deltas
    head_lr_factor: float  #: task head learning rate = ``head_lr_factor * learning_rate``
    lr_scheduler_type: str  #: a ``transformers`` scheduler name (``TrainingArguments.lr_scheduler_type``)
    warmup_ratio: float  #: fraction of the planned steps used for linear warm-up
    num_epochs: float  #: planned epochs (the schedule's length); early stopping usually ends sooner
    early_stopping_patience: int  #: evaluations (epochs) without dev improvement before stopping
    #: start with the first token attending uniformly: True, False or ``"auto"`` (see :mod:`.cls_init`)
    cls_attention_init: bool | str = False
    #: keep the epoch with the best dev metric (True) or the last epoch (False); early stopping always keeps the best
    restore_best_epoch: bool = True

    def head_learning_rate(self, learning_rate: float) -> float:
        """Head learning rate for a bias learning rate ``learning_rate``."""
        return self.head_lr_factor * learning_rate


#: The defaults (dev-selected, see the module docstring).
RECIPE = Recipe(
    learning_rate=1e-2,
    head_lr_factor=10.0,
    lr_scheduler_type="linear",
    warmup_ratio=0.1,
    num_epochs=16.0,
    early_stopping_patience=0,
    cls_attention_init="auto",
    restore_best_epoch=False,
)
#: Used instead of the recipe's length when ``train`` gets no data (the packaged SMS Spam demo): sample caps, a short
#: length and 4 planned epochs, so that the demo (MiniLM-L6, 2 CPU cores) finishes well under 2 minutes.
DEMO_DEFAULTS: dict[str, Any] = {"max_train_samples": 800, "max_eval_samples": 250, "max_length": 64, "num_epochs": 4.0}
#: The recipe before issue 15 (kept for the before/after comparison in ``docs/accuracy.md``).
RECIPE_V0 = Recipe(
    learning_rate=1e-3,
    head_lr_factor=3.0,
    lr_scheduler_type="linear",
    warmup_ratio=0.0,
    num_epochs=3.0,
    early_stopping_patience=2,
)


def check_schedule(
    learning_rate: Any, warmup_ratio: float, lr_scheduler_type: str, num_epochs: float, auto_grid: Any = None
) -> None:
    """Validate the optimisation settings of :func:`train` before any data or model is loaded (one-line errors)."""
    from transformers import SchedulerType

    if isinstance(learning_rate, str) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number or 'auto', got {learning_rate!r}; e.g. 1e-2")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not num_epochs > 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}")
    names = [t.value for t in SchedulerType]
    if lr_scheduler_type not in names:
        raise ValueError(f"unknown lr_scheduler_type {lr_scheduler_type!r}; choose one of {', '.join(names)}")
    if auto_grid is not None:

        check_grid(auto_grid)
