"""Small shared helpers."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from bitfit_peft.fmt import human_bytes  # noqa: F401 - its former home

#: dtype names accepted anywhere (config ``save_dtype``, ``--dtype``), with their short forms
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's (CPU and every CUDA device's) random state.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> with preserved_random_state():
        ...     _ = torch.rand(3)
        >>> after = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> torch.equal(after, torch.rand(1))
        True
    """
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
