"""The base-model fingerprint: which base an adapter was trained on, stored in ``adapter_config.json``.

A fingerprint (format 2) is a small JSON object saved as ``BitFitConfig.base_fingerprint``::

    {"version": 2, "structure": "sha256:<names, bias shapes, has-bias flags>",
     "bias_sketch": [16 floats], "bias_norm": float, "weight_sketch": [16 floats], "weight_norm": float}

The structure hash must match exactly. The values of the targeted modules (original biases and the first
``WEIGHT_SAMPLE`` weight values) enter as *sketches*: projections onto fixed pseudo-random +-1 vectors seeded by the
module name. Casting the base to fp16 or bf16 moves a projection by about ``2**-9`` of the vector's norm; a different
base moves it by about the norm of the difference. So the check accepts a projection error up to ``TOLERANCE`` of
the norm (the same base in fp32/fp16/bf16 passes, a base whose values differ by more than ~0.5 % is refused).

Fingerprints written by bitfit-peft 0.1.0 (a ``"sha256:..."`` string over bf16-rounded values) are still checked,
exactly as 0.1.0 did (:func:`legacy_fingerprint`).

Example:
    >>> import torch
    >>> entries = [("lin", (2,), torch.tensor([0.5, -1.0]), torch.tensor([0.3, 0.1]))]
    >>> fp = compute(entries)
    >>> half = [("lin", (2,), torch.tensor([0.5, -1.0]).half(), torch.tensor([0.3, 0.1]).bfloat16())]
    >>> matches(fp, compute(half))
    True
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from bitfit_peft.names import PEFT_PREFIX

VERSION = 2
SKETCH_SIZE = 16
WEIGHT_SAMPLE = 16  # the 0.1.0 value; also used by format 2
TOLERANCE = 0.005
#: the weight tolerance when either side was dequantized from 4-bit or 8-bit: NF4 / FP4 / int8 copies of a base
#: move its weight sketch by up to 0.17 / 0.26 / 0.012 of the norm, another base of the same shapes by about 2.0
#: (a random base passes all 16 projections with probability ~1e-9). A fine-tune of the same base passes too.
QUANTIZED_TOLERANCE = 0.5

Entry = tuple[str, tuple[int, ...], "torch.Tensor | None", "torch.Tensor | None"]


def relative_name(name: str) -> str:
    """A module name without PEFT's wrapper prefixes (the fingerprint does not depend on how the model is wrapped)."""
    for prefix in (PEFT_PREFIX, "_orig_mod."):
        name = name.removeprefix(prefix)
    return name


@functools.lru_cache(maxsize=8)
def _signs(kind: str, n: int) -> torch.Tensor:
    """``[SKETCH_SIZE, n]`` fixed pseudo-random +-1 (the same for every process and release; cached per size)."""
    generator = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    return torch.randint(0, 2, (SKETCH_SIZE, n), generator=generator, dtype=torch.int8).to(torch.float32) * 2 - 1


def compute(entries: Iterable[Entry], *, quantized: bool = False) -> dict[str, Any]:
    """The format-2 fingerprint of ``entries`` (see the module docstring); ``quantized``: the weight samples were
    dequantized (stored as ``"weight_quantized": true``, which widens the weight tolerance on both sides).

    Values are concatenated in name order (the exact ``structure`` hash guarantees the same order on both sides)
    and projected at once.
    """
    structure = hashlib.sha256()
    values: dict[str, list[torch.Tensor]] = {"bias": [], "weight": []}
    for name, shape, bias, weight_sample in sorted(entries, key=lambda e: e[0]):
        structure.update(f"{name}|{tuple(shape)}|{bias is not None};".encode())
        for kind, tensor in (("bias", bias), ("weight", weight_sample)):
            if tensor is not None and tensor.numel():
                values[kind].append(tensor.detach().reshape(-1).to("cpu", torch.float32))
    out: dict[str, Any] = {"version": VERSION, "structure": "sha256:" + structure.hexdigest()}
    if quantized:
        out["weight_quantized"] = True
    for kind, parts in values.items():
        flat = torch.cat(parts) if parts else torch.zeros(0)
        sketch = (_signs(kind, flat.numel()) @ flat).tolist() if flat.numel() else [0.0] * SKETCH_SIZE
        out[f"{kind}_sketch"] = [float(f"{v:.7g}") for v in sketch]
        out[f"{kind}_norm"] = float(f"{float(flat.double().norm()):.7g}")
    return out


def matches(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether two format-2 fingerprints describe the same base (any dtype of it)."""
    if expected.get("structure") != actual.get("structure"):
        return False
    try:
        quantized = expected.get("weight_quantized") is True or actual.get("weight_quantized") is True
        for kind in ("bias", "weight"):
            norm = max(float(expected[f"{kind}_norm"]), float(actual[f"{kind}_norm"]))
            bound = (QUANTIZED_TOLERANCE if kind == "weight" and quantized else TOLERANCE) * norm + 1e-12
            want, got = list(expected[f"{kind}_sketch"]), list(actual[f"{kind}_sketch"])
            if len(want) != SKETCH_SIZE or len(got) != SKETCH_SIZE:
                return False
            if not all(abs(float(a) - float(b)) <= bound for a, b in zip(want, got, strict=True)):
                return False
    except (KeyError, TypeError, ValueError):  # a malformed stored fingerprint matches nothing
        return False
    return True


def legacy_fingerprint(entries: Iterable[Entry]) -> str:
    """The bitfit-peft 0.1.0 fingerprint: ``sha256`` over names, shapes and bf16-rounded values."""
    digest = hashlib.sha256()
    for name, shape, bias, weight_sample in sorted(entries, key=lambda e: e[0]):
        digest.update(f"{name}|{tuple(shape)}|".encode())
        for tensor in (bias, weight_sample):
            if tensor is None:
                digest.update(b"none|")
            else:
                values = tensor.detach().reshape(-1).to("cpu", torch.bfloat16).contiguous().view(torch.int16)
                digest.update(values.numpy().tobytes() + b"|")
        digest.update(b";")
    return "sha256:" + digest.hexdigest()


def check(expected: str | Mapping[str, Any], entries: list[Entry], *, quantized: bool = False) -> bool:
    """Whether the model's ``entries`` (``quantized``: dequantized weight samples) match a stored fingerprint."""
    if isinstance(expected, str):
        return legacy_fingerprint(entries) == expected
    return matches(expected, compute(entries, quantized=quantized))


def describe(fingerprint: str | Mapping[str, Any] | None) -> str:
    """A short, printable form (for error messages and model cards)."""
    if fingerprint is None:
        return "none"
    if isinstance(fingerprint, str):
        return fingerprint[:19] + "..."
    return str(fingerprint.get("structure", "?"))[:19] + "..."
