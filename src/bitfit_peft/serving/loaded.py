"""What the engine knows about one adapter: how to load it (:class:`LoadRequest`), what it is once loaded
(:class:`LoadedAdapter`) and what it reports (:class:`AdapterInfo`).

A loaded adapter answers as one *kind*: ``classification`` (labels), ``regression`` (outputs), ``embedding`` or
``generation``; :func:`describe` decides from the engine's task type, the adapter's head and the metadata next to
it.

Example:
    >>> describe("emb", "FEATURE_EXTRACTION", [], base_outputs=2, meta={})
    ('embedding', None, None)
    >>> describe("sst2", "SEQ_CLS", [], base_outputs=2, meta={"labels": ["neg", "pos"]})
    ('classification', ['neg', 'pos'], 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.heads_shape import last_linear
from bitfit_peft.serving.layouts import Layout

__all__ = ["AdapterInfo", "LoadRequest", "LoadedAdapter", "describe", "tensor_bytes"]


@dataclass(frozen=True)
class LoadRequest:
    """How to (re)load an adapter: the arguments of :meth:`MultiTaskEngine.add_adapter`, ``within`` resolved."""

    source: str | Path
    revision: str | None = None
    label_names: tuple[str, ...] | None = None
    allow_hub: bool = True
    allow_base_mismatch: bool = False
    hub: bool | None = None
    within: tuple[Path, ...] | None = None  #: resolved folders a local source must lie in; None: anywhere


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter in the served model, as the engine knows it."""

    name: str
    internal: str  #: its PEFT adapter name (``name__7``: see ``registry.py``)
    source: str
    task_type: str | None
    kind: str  #: classification, regression, embedding or generation
    labels: list[str] | None
    layout: Layout
    outputs: int | None = None  #: head outputs (SEQ_CLS)
    sizes: tuple[int, int, int] = (0, 0, 0)  #: delta params, delta bytes, head bytes

    def info(self) -> AdapterInfo:
        n_delta, delta_bytes, head_bytes = self.sizes
        return AdapterInfo(self.name, self.source, self.task_type, self.kind, self.labels,
                           len(self.labels) if self.labels else None, n_delta, delta_bytes, head_bytes)


@dataclass
class AdapterInfo:
    """What :meth:`MultiTaskEngine.adapters` reports for one loaded adapter."""

    name: str
    source: str
    task_type: str | None
    kind: str
    labels: list[str] | None
    num_labels: int | None
    delta_params: int
    delta_bytes: int
    head_bytes: int

    @property
    def total_bytes(self) -> int:
        """Memory this adapter adds on top of the shared base (bias deltas + its own head copy)."""
        return self.delta_bytes + self.head_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def describe(name: str, task_type: str, heads: Iterable[nn.Module], base_outputs: int,
             meta: dict[str, Any]) -> tuple[str, list[str] | None, int | None]:
    """``(kind, labels, head outputs)`` of adapter ``name`` with head copies ``heads``, from its metadata ``meta``.

    ``base_outputs``: the base's ``num_labels`` (for an adapter without a head of its own). Raises
    :class:`EngineError` when the label names do not match the head.
    """
    if task_type == "FEATURE_EXTRACTION":
        return "embedding", None, None
    if task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        return "generation", None, None
    outputs = base_outputs
    for head in heads:
        found = last_linear(head)
        if found is not None:
            outputs = int(found[1].weight.shape[0])
            break
    labels = meta.get("labels")
    kind = meta.get("kind") or ("regression" if outputs == 1 and not labels else "classification")
    if kind != "classification":
        return kind, None, outputs
    labels = labels or [f"LABEL_{i}" for i in range(outputs)]
    if len(labels) != outputs:
        raise EngineError(f"Adapter {name!r}: its head has {outputs} outputs but {len(labels)} label names were found "
                          f"({labels[:8]}). Fix the label names (label_names=...) or the head.")
    return kind, labels, outputs


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(elements, bytes)`` of ``tensors``."""
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)
