"""Train several BitFit tasks at once: a data collator that puts ``adapter_names`` into every batch.

``Trainer`` passes every key of the collated batch to ``model(**batch)``, and ``PeftModel.forward`` hands
``adapter_names`` to the BitFit routing, so each sample's loss flows only into its own task's deltas and its own
classifier head (the core routes heads per sample on every mixed-task call; nothing to enable).

Example:
    >>> collator = MultiTaskCollator(collate=lambda rows: {"x": [r["x"] for r in rows]})
    >>> collator([{"task": "sst2", "x": 1, "text": "fine"}, {"task": "spam", "x": 2, "text": "WIN"}])
    {'x': [1, 2], 'adapter_names': ['sst2', 'spam']}

With a tokenizer (features carry a ``"task"`` key; keep that column in the dataset)::

    collator = MultiTaskCollator(tokenizer)
    args = TrainingArguments(..., remove_unused_columns=False)
    Trainer(model=peft_model, args=args, train_dataset=mixed, data_collator=collator).train()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["MultiTaskCollator"]


class MultiTaskCollator:
    """Collate features of mixed tasks and add ``adapter_names`` (one adapter name per sample).

    Args:
        tokenizer: used for padding (``DataCollatorWithPadding``) unless ``collate`` is given.
        task_key: the feature key naming each sample's task / adapter.
        collate: the inner collator for the remaining keys (default: ``DataCollatorWithPadding(tokenizer)``).
        drop_keys: feature keys to discard before collating (raw text columns...). String-valued keys are
            always dropped.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        task_key: str = "task",
        collate: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None = None,
        drop_keys: Sequence[str] = (),
    ) -> None:
        if collate is None:
            if tokenizer is None:
                raise ValueError("MultiTaskCollator needs a tokenizer or a collate function.")
            from transformers import DataCollatorWithPadding

            collate = DataCollatorWithPadding(tokenizer)
        self.collate = collate
        self.task_key = task_key
        self.drop_keys = set(drop_keys)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        try:
            names = [str(f[self.task_key]) for f in features]
        except KeyError as err:
            raise KeyError(
                f"MultiTaskCollator: a feature has no {self.task_key!r} key. Keep the task column in the "
                "dataset (TrainingArguments(remove_unused_columns=False))."
            ) from err
        # decided over the whole batch: tasks concatenated with other text columns hold None in each other's columns
        drop = {self.task_key, *self.drop_keys}
        drop |= {k for f in features for k, v in f.items() if v is None or isinstance(v, str)}
        rest = [{k: v for k, v in f.items() if k not in drop} for f in features]
        batch = dict(self.collate(rest))
        batch["adapter_names"] = names
        return batch
