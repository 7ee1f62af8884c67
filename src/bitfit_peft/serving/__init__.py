"""Multi-task serving: one base model, many BitFit adapters, mixed-task batches.

- :class:`MultiTaskEngine`: Python API (``add_adapter`` / ``remove_adapter`` / ``predict`` / ``generate``).
- :func:`create_app`: FastAPI server with dynamic batching (``bitfit-peft serve``).
- :func:`enable_head_routing`: kept for compatibility; the core routes classifier heads per sample on every
  mixed-task call by itself.
- :class:`MultiTaskCollator`: a Trainer data collator that emits ``adapter_names`` (train several tasks at once).

See ``docs/serving.md``.
"""

from __future__ import annotations

from bitfit_peft.serving.engine import AdapterInfo, Generation, MultiTaskEngine, Prediction
from bitfit_peft.serving.errors import (
    AdapterNameError,
    AdapterNotFoundError,
    AdapterPathError,
    BadAdapterPathError,
    DuplicateAdapterError,
    EngineError,
    UnknownTaskError,
)
from bitfit_peft.training.collator import MultiTaskCollator
from bitfit_peft.tuner.heads import enable_head_routing

__all__ = [
    "AdapterInfo",
    "AdapterNameError",
    "AdapterNotFoundError",
    "AdapterPathError",
    "BadAdapterPathError",
    "DuplicateAdapterError",
    "EngineError",
    "Generation",
    "MultiTaskCollator",
    "MultiTaskEngine",
    "Prediction",
    "UnknownTaskError",
    "create_app",
    "enable_head_routing",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: FastAPI is only imported when the server is used
    if name == "create_app":
        from bitfit_peft.serving.server import create_app  # deferred: FastAPI only when a server is made

        return create_app
    raise AttributeError(name)
