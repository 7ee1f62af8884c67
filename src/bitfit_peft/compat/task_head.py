"""The base model's task head sized to the adapter's before ``PeftModel.from_pretrained`` loads it.

A BitFit adapter for a task with a head (``SEQ_CLS``, ``TOKEN_CLS``) records ``num_labels`` and ``id2label`` in its
``adapter_config.json`` and carries the head in full (a ``modules_to_save`` tensor). A base loaded with another
label count (``AutoModelForSequenceClassification.from_pretrained(base)`` gives 2, and so does
``AutoPeftModelForSequenceClassification``) then gets a fresh head of the adapter's size, which the load fills from
the file; the base config takes the adapter's label names. When the adapter does not carry the head, or an adapter
saved before 0.3 does not fit, the error says which ``num_labels`` to pass. ``_compat`` entry 2 calls these.

Example:
    >>> import torch
    >>> from bitfit_peft.compat.task_head import head_size_error
    >>> from bitfit_peft.errors import BitFitError
    >>> err = BitFitError("mismatch: ['classifier.modules_to_save.default.weight: file (5, 8) vs model (2, 8)']")
    >>> "num_labels=5" in str(head_size_error(err, "AutoModelForSequenceClassification"))
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from bitfit_peft.compat.transformers_io import head_modules
from bitfit_peft.errors import BitFitError
from bitfit_peft.tasks import task_of

_HEAD_MISMATCH = re.compile(r"modules_to_save\.[^:',]*: file \((\d+)[,)][^']*? vs model \((\d+)[,)]")


def _fix(wanted: int, auto_model: str) -> str:
    return f"load the base with num_labels={wanted}, e.g. {auto_model}.from_pretrained(base, num_labels={wanted})"


def fit_head(model: nn.Module, config: Any) -> Callable[[], None]:
    """Give ``model`` a head of ``config.num_labels`` outputs and ``config.id2label``'s names; returns the undo.

    Raises :class:`BitFitError` (nothing changed) when the sizes differ and the adapter does not carry the head.
    """
    wanted, model_config = getattr(config, "num_labels", None), getattr(model, "config", None)
    task = task_of(getattr(config, "task_type", None))
    if wanted is None or model_config is None or not task.heads:
        return lambda: None
    have = getattr(model_config, "num_labels", None)
    saved = (have, getattr(model_config, "id2label", None), getattr(model_config, "label2id", None))
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    if have != wanted:
        linears = [
            (name, sub)
            for head_name, head in head_modules(model, config).items()
            for name, sub in ((f"{head_name}.{n}".rstrip("."), m) for n, m in head.named_modules())
            if isinstance(sub, nn.Linear) and sub.out_features == have
        ]
        if not linears:
            raise BitFitError(
                f"The adapter was trained with num_labels={wanted} but the base model's head has {have} outputs, and "
                f"the adapter does not carry the head: {_fix(wanted, task.auto_model)}. The model is unchanged."
            )
        for name, old in linears:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            w = old.weight
            new = nn.Linear(old.in_features, wanted, bias=old.bias is not None, device=w.device, dtype=w.dtype)
            setattr(parent, child, new)
            replaced.append((parent, child, old))
        model_config.num_labels = wanted
    names = getattr(config, "id2label", None)
    if names:
        model_config.id2label = {int(k): v for k, v in names.items()}
        model_config.label2id = {v: int(k) for k, v in names.items()}

    def undo() -> None:
        for parent, child, old in replaced:
            setattr(parent, child, old)
        if replaced:
            model_config.num_labels = saved[0]
        if names:
            model_config.id2label, model_config.label2id = saved[1], saved[2]

    return undo


def head_size_error(err: BaseException, auto_model: str) -> BitFitError | None:
    """For a load refused because the head's size differs (an adapter without ``num_labels``, saved before 0.3):
    a one-line error saying which ``num_labels`` to pass; None for any other error."""
    found = _HEAD_MISMATCH.search(str(err))
    if found is None:
        return None
    wanted, have = int(found.group(1)), int(found.group(2))
    if wanted == have:  # the head's input size differs: not a matter of num_labels
        return None
    return BitFitError(
        f"The adapter's task head has {wanted} outputs but the base model's has {have}: {_fix(wanted, auto_model)}. "
        "The model is unchanged."
    )
