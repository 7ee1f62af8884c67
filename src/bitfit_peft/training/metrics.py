"""Evaluation metrics for :func:`bitfit_peft.training.train`: ``compute_metrics`` for :class:`transformers.Trainer`.

Example:
    >>> import numpy as np
    >>> from transformers import EvalPrediction
    >>> m = make_compute_metrics("seq-cls")(EvalPrediction(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0])))
    >>> m["accuracy"]
    0.5
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from bitfit_peft.training.data import IGNORE_INDEX

#: The metric that selects the best checkpoint, per task.
MAIN_METRIC = {"seq-cls": "accuracy", "regression": "pearson", "token-cls": "accuracy", "causal-lm": "loss"}


def _first(x: Any) -> np.ndarray:
    return np.asarray(x[0] if isinstance(x, (tuple, list)) else x)


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def make_compute_metrics(task: str):
    """``compute_metrics`` for Trainer: accuracy (+ macro F1), Pearson/Spearman/MSE or token accuracy."""

    def compute(pred: EvalPrediction) -> dict[str, float]:
        preds, labels = _first(pred.predictions), _first(pred.label_ids)
        if task == "regression":
            p, y = preds.reshape(-1).astype(np.float64), labels.reshape(-1).astype(np.float64)
            return {
                "pearson": _pearson(p, y),
                "spearman": _pearson(_rank(p), _rank(y)),
                "mse": float(np.mean((p - y) ** 2)),
            }
        if task == "seq-cls":
            p = preds.argmax(-1)
            out = {"accuracy": float((p == labels).mean())}
            f1s = []
            for c in np.unique(np.concatenate([labels, p])):
                tp = float(((p == c) & (labels == c)).sum())
                denom = float((p == c).sum() + (labels == c).sum())
                f1s.append(2 * tp / denom if denom else 0.0)
            out["f1_macro"] = float(np.mean(f1s))
            return out
        # token-cls: predictions are argmax ids already (see _argmax_logits); causal-lm: shift by one
        if task == "causal-lm":
            preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX
        return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0}

    return compute


def argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    """Keep only argmax ids of per-token logits, so evaluation does not store (N, T, vocab) arrays."""
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(dim=-1)


def clean_metrics(raw: dict[str, float]) -> dict[str, float]:
    """``Trainer.evaluate`` output without the ``eval_`` prefix and timing keys (+ perplexity where it applies)."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    out = {}
    for key, value in raw.items():
        name = key.removeprefix("eval_")
        if not name.startswith(skip):
            out[name] = float(value)
    if "loss" in out and "accuracy" in out and "pearson" not in out and "f1_macro" not in out:
        out["perplexity"] = float(np.exp(min(out["loss"], 50.0)))  # causal-lm / token-cls
    return out
