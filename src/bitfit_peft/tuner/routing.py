"""Per-sample adapter routing for mixed-task batches.

One :class:`Routing` object is shared by all BitFit layers of a model. ``PeftModel.forward(...,
adapter_names=[...])`` fills it once per call (the per-sample row index into each layer's stacked delta table);
every layer then does a single gather-add. Row 0 of every table is the bare base (``"__base__"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE_ADAPTER_NAME = "__base__"


@dataclass
class Routing:
    """Per-call routing state shared by the layers of one model."""

    adapters: tuple[str, ...] | None = None  # table rows 1..n
    rows: list[int] | None = None  # per-sample row (0 = base)
    index: torch.Tensor | None = None  # the same rows as a tensor: what the layers read (compile-friendly)
    expected_batch: int | None = None  # checked once by the model's first call when the batch size was unknown
    _index_cache: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)

    def set(self, adapter_names: list[str], device: torch.device | str | None = None) -> None:
        """Route sample ``i`` to ``adapter_names[i]`` (``"__base__"`` = no delta)."""
        unique = tuple(dict.fromkeys(n for n in adapter_names if n != BASE_ADAPTER_NAME))
        position = {name: i + 1 for i, name in enumerate(unique)}
        self.adapters = unique
        self.rows = [position.get(n, 0) for n in adapter_names]
        self.index = torch.tensor(self.rows, dtype=torch.long, device=device)
        self._index_cache = {}

    def clear(self) -> None:
        self.adapters = None
        self.rows = None
        self.index = None
        self.expected_batch = None
        self._index_cache = {}

    def index_for(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """Row index for a tensor whose first dim has ``n_rows`` entries.

        ``n_rows`` may be a multiple of the batch size: beam search, ``num_return_sequences`` and flattened
        ``(batch * seq, hidden)`` inputs all repeat each sample contiguously, i.e. ``repeat_interleave``.
        Under ``torch.compile`` it is plain tensor code (no Python caches, a ``torch._check`` for the multiple).
        """
        index = self.index
        assert index is not None
        batch = index.shape[0]
        if torch.compiler.is_compiling():
            index = index.to(device)
            if n_rows == batch:
                return index
            torch._check(n_rows % batch == 0)
            return index.repeat_interleave(n_rows // batch)
        key = (n_rows, device)
        cached = self._index_cache.get(key)
        if cached is not None:
            return cached
        if n_rows % batch:
            raise RuntimeError(
                f"Mixed-adapter batch: got {batch} adapter_names but a layer saw {n_rows} rows, which is not a "
                "multiple. Pass exactly one adapter name per input sample."
            )
        index = index.to(device)
        if n_rows != batch:
            index = index.repeat_interleave(n_rows // batch)
        self._index_cache[key] = index
        return index
