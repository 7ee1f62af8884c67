"""BitFit's default training recipe: the optimisation defaults of :class:`~bitfit_peft.training.args.TrainArgs`
(so of :func:`bitfit_peft.training.train` and ``bitfit-peft train``).

Bias-only training needs larger learning rates and more steps than full fine-tuning; a fresh task head needs a
larger learning rate still. The values of :data:`RECIPE` were selected on **dev** data of the accuracy suite
(``benchmarks/accuracy``, MiniLM-L6, four tasks; evidence in ``docs/accuracy.md``, "The default recipe").
Dev is evaluated every epoch, but the model of the *last* epoch is kept: with the linear decay to zero it is the
converged one, and on small dev sets picking the best epoch fits dev noise.

Example:
    >>> from bitfit_peft.training.recipe import RECIPE
    >>> RECIPE.head_learning_rate(RECIPE.learning_rate) == RECIPE.learning_rate * RECIPE.head_lr_factor
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
