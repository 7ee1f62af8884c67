"""The Trainer of :func:`bitfit_peft.training.train`: bias deltas and task head at their own learning rates.

Example:
    >>> import torch
    >>> from bitfit_peft.training.trainer import bitfit_param_groups
    >>> bitfit_param_groups(torch.nn.Linear(2, 2), lr=1e-2, head_lr=1e-1)[0]["lr"]
    0.01
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


def bitfit_param_groups(
    model: torch.nn.Module, lr: float, head_lr: float | None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups: bias deltas at ``lr``, task heads (``modules_to_save``) at ``head_lr``.

    Weight decay applies to head weight matrices only, never to bias deltas.
    """
    deltas, head_decay, head_no_decay, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "modules_to_save" in name:
            (head_decay if p.ndim >= 2 else head_no_decay).append(p)
        elif "bitfit_delta" in name:
            deltas.append(p)
        else:
            other.append(p)
    head_lr = lr if head_lr is None else head_lr
    groups = [
        {"params": deltas, "lr": lr, "weight_decay": 0.0},
        {"params": head_decay, "lr": head_lr, "weight_decay": weight_decay},
        {"params": head_no_decay, "lr": head_lr, "weight_decay": 0.0},
        {"params": other, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class BitFitTrainer(Trainer):
    """:class:`transformers.Trainer` whose optimizer uses :func:`bitfit_param_groups`."""

    def __init__(self, *args: Any, head_learning_rate: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = bitfit_param_groups(
                opt_model, self.args.learning_rate, self.head_learning_rate, self.args.weight_decay
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
