"""What :func:`bitfit_peft.training.train` returns (:class:`TrainResult`) and the parameter counts it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class TrainResult:
    """What :func:`train` did: metrics on the dev set before/after training, sizes and timings."""

    task: str
    metric_name: str
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    majority_accuracy: float | None
    trainable_params: int
    total_params: int
    bias_params: int
    head_params: int
    adapter_size_bytes: int
    output_dir: str
    wall_time_s: float
    train_time_s: float
    num_train: int
    num_dev: int
    epochs_run: float
    best_checkpoint: str | None = None
    label_names: list[str] | None = None
    hub_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_before(self) -> float | None:
        """Dev accuracy before training (sequence / token / next-token accuracy; None for regression)."""
        return self.metrics_before.get("accuracy")

    @property
    def accuracy_after(self) -> float | None:
        """Dev accuracy after training (the restored best checkpoint)."""
        return self.metrics_after.get("accuracy")

    @property
    def beats_majority(self) -> bool | None:
        """Whether the final dev accuracy beats always predicting the majority class (None: not a seq-cls run)."""
        if self.majority_accuracy is None or self.accuracy_after is None:
            return None
        return self.accuracy_after > self.majority_accuracy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_before"], d["accuracy_after"] = self.accuracy_before, self.accuracy_after
        d["beats_majority"] = self.beats_majority
        return d


def count_params(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(trainable, total, bias-delta, head) parameter counts of a BitFit model."""
    trainable = total = bias = head = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if "bitfit_delta" in name:
                bias += p.numel()
            elif "modules_to_save" in name:
                head += p.numel()
    return trainable, total, bias, head
