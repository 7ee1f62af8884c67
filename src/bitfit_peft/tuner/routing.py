"""Per-sample adapter routing for mixed-task batches.

``PeftModel.forward(..., adapter_names=[...])`` routes sample ``i`` through ``adapter_names[i]``. The model keeps
one :class:`Routing` (the mapping of the call in progress, which the per-sample heads read) and hands every BitFit
layer a frozen :class:`MixedCall` carrying the same mapping: the per-sample row index into the layer's stacked
delta table, and the layer's rows gathered for all layers at once. Row 0 of every table is the bare base
(``"__base__"``).

Example:
    >>> routing = Routing()
    >>> routing.set(["spam", "__base__", "sst2", "spam"])
    >>> routing.adapters, routing.rows
    (('spam', 'sst2'), [1, 0, 2, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from bitfit_peft.errors import BitFitError

BASE_ADAPTER_NAME = "__base__"
RESERVED_ADAPTER_NAMES = frozenset({BASE_ADAPTER_NAME})  #: names no adapter may take (they mean the bare base)


def check_adapter_name(name: str) -> None:
    """Refuse a reserved routing name as an adapter's name, on every path that creates an adapter (PEFT's
    ``add_adapter`` / ``load_adapter`` / ``from_pretrained``, transformers' ``load_adapter``, weighted combination).
    """
    if name in RESERVED_ADAPTER_NAMES:
        raise BitFitError(f"Adapter name {name!r} is reserved (it routes samples to the bare base model in a mixed "
                          "batch); pick another name.")


class MixedCall(NamedTuple):
    """One layer's part of one mixed-batch call: a frozen value the model stages before the call.

    The model builds it once per call and layer (:mod:`~bitfit_peft.tuner.call_plan`); the layer only reads it.
    Like LoRAX's ``AdapterBatchMetadata``, it carries the whole per-call mapping, so the layer consults nothing else.
    """

    index: torch.Tensor  #: ``[batch]`` long: per sample, its row of the delta table (0 = bare base, no delta)
    adapters: tuple[str, ...]  #: the adapters of table rows ``1..n``
    #: this layer's ``[batch, bias]`` rows, gathered for all layers at once; None: the layer (offloaded, hooked)
    #: builds its table from ``adapters`` when it runs and gathers with ``index`` itself
    rows: torch.Tensor | None = None


@dataclass
class Routing:
    """The model's per-call routing state: staged before a mixed call, read by the per-sample heads."""

    adapters: tuple[str, ...] | None = None  # table rows 1..n
    rows: list[int] | None = None  # per-sample row (0 = base)
    index: torch.Tensor | None = None  # the same rows as a tensor (what each layer's MixedCall carries)
    expected_batch: int | None = None  # checked once by the model's first call when the batch size was unknown

    def set(self, adapter_names: list[str], device: torch.device | str | None = None) -> None:
        """Route sample ``i`` to ``adapter_names[i]`` (``"__base__"`` = no delta)."""
        unique = tuple(dict.fromkeys(n for n in adapter_names if n != BASE_ADAPTER_NAME))
        position = {name: i + 1 for i, name in enumerate(unique)}
        self.adapters = unique
        self.rows = [position.get(n, 0) for n in adapter_names]
        self.index = torch.tensor(self.rows, dtype=torch.long, device=device)

    def clear(self) -> None:
        self.adapters = None
        self.rows = None
        self.index = None
        self.expected_batch = None
