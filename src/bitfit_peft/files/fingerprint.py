"""The base-model fingerprint: which base an adapter was trained on, stored in ``adapter_config.json``.

A fingerprint (format 3) is a small JSON object saved as ``BitFitConfig.base_fingerprint``::

    {"version": 3, "structure": "sha256:<names, bias shapes, has-bias flags, embedding shapes>",
     "bias_sketch": [16 floats], "bias_norm": float, "weight_sketch": [16 floats], "weight_norm": float,
     "embedding_sketch": [16 floats], "embedding_norm": float}

**What goes in.** The names and bias shapes of every targeted module and the shapes of every embedding (hashed:
must match exactly); the full original bias of every targeted module; :data:`WEIGHT_SAMPLE` values of each targeted
module's weight and :data:`EMBEDDING_SAMPLE` values of each embedding matrix, at positions spread evenly across the
*whole* tensor (stride ``numel / k``, an offset derived from the module name): every row block of a weight
contributes, not only its first values. The three value groups enter as *sketches*: projections onto fixed
pseudo-random +-1 vectors, compared within :data:`TOLERANCE` of the model's own norm (and the stored norms must
agree with the model's to the same tolerance).

**What it proves.** That the base in memory is, up to a dtype cast (fp32/fp16/bf16 move a projection by about
``2**-9`` of the norm), the base the adapter was saved against, *as far as a mistake goes*: another checkpoint of the
same architecture, a re-initialised or replaced layer or embedding, a base whose values all moved by ~0.5 % or more
(an honest full fine-tune of it) is refused.

**What it does not prove.** It is a check against mistakes, not a signature: anyone can read the sample positions
in this file and craft a base that copies the biases and the sampled values and differs everywhere else; it does
not look at weights of modules that are not targeted (besides the embeddings), nor at any value between the
sampled ones; a quantized base widens the weight tolerance to :data:`QUANTIZED_TOLERANCE`. Use a content hash of the
checkpoint files (the Hub revision) when you need to know the exact base.

Formats 2 (the first 16 values of each weight, no embeddings) and 0.1.0 (a ``"sha256:..."`` string over bf16-rounded
values) are still checked as written; stored values are bounded (:func:`check_stored`) before anything is compared.

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
import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from bitfit_peft.errors import BitFitError
from bitfit_peft.names import PEFT_PREFIX

VERSION = 3
SKETCH_SIZE = 16
LEGACY_WEIGHT_SAMPLE = 16  #: formats 0.1.0 and 2: the first 16 values of each weight
WEIGHT_SAMPLE = 64  #: format 3: values of each targeted weight, spread over the whole tensor
EMBEDDING_SAMPLE = 4096  #: format 3: values of each embedding matrix, spread over the whole tensor
TOLERANCE = 0.005
MAX_NORM = 1e15  #: a stored norm (or sketch value) beyond this, or not finite, is refused: no real base has it
#: the weight tolerance when either side was dequantized from 4-bit or 8-bit: NF4 / FP4 / int8 copies of a base
#: move its weight sketch by up to 0.17 / 0.26 / 0.012 of the norm, another base of the same shapes by about 2.0
#: (a random base passes all 16 projections with probability ~1e-9). A fine-tune of the same base passes too.
QUANTIZED_TOLERANCE = 0.5

Entry = tuple[str, tuple[int, ...], "torch.Tensor | None", "torch.Tensor | None"]
#: an embedding matrix: (name, shape, sampled values)
Embedding = tuple[str, tuple[int, ...], "torch.Tensor"]
KINDS = {2: ("bias", "weight"), 3: ("bias", "weight", "embedding")}


def relative_name(name: str) -> str:
    """A module name without PEFT's wrapper prefixes (the fingerprint does not depend on how the model is wrapped)."""
    for prefix in (PEFT_PREFIX, "_orig_mod."):
        name = name.removeprefix(prefix)
    return name.replace(".original_module", "")


@functools.lru_cache(maxsize=8)
def _signs(kind: str, n: int) -> torch.Tensor:
    """``[SKETCH_SIZE, n]`` fixed pseudo-random +-1 (the same for every process and release; cached per size)."""
    generator = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    return torch.randint(0, 2, (SKETCH_SIZE, n), generator=generator, dtype=torch.int8).to(torch.float32) * 2 - 1


def sample_positions(name: str, numel: int, k: int) -> torch.Tensor | None:
    """``k`` flat positions spread evenly over a tensor of ``numel`` values (offset from ``name``); None: all."""
    if numel <= k:
        return None
    stride = numel / k
    offset = (zlib.crc32(name.encode()) % 1_000_003) / 1_000_003 * stride
    return (torch.arange(k, dtype=torch.float64) * stride + offset).floor().long().clamp_(max=numel - 1)


def compute(
    entries: Iterable[Entry],
    *,
    quantized: bool = False,
    embeddings: Iterable[Embedding] | None = None,
    version: int = VERSION,
) -> dict[str, Any]:
    """The fingerprint of ``entries`` (and ``embeddings``, format 3; see the module docstring); ``quantized``: the
    weight samples were dequantized (stored as ``"weight_quantized": true``, which widens the weight tolerance).

    Values are concatenated in name order (the exact ``structure`` hash guarantees the same order on both sides)
    and projected at once.
    """
    structure = hashlib.sha256()
    values: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS[version]}
    for name, shape, bias, weight_sample in sorted(entries, key=lambda e: e[0]):
        structure.update(f"{name}|{tuple(shape)}|{bias is not None};".encode())
        for kind, tensor in (("bias", bias), ("weight", weight_sample)):
            if tensor is not None and tensor.numel():
                values[kind].append(tensor.detach().reshape(-1).to("cpu", torch.float32))
    if version >= 3:
        for name, shape, sample in sorted(embeddings or (), key=lambda e: e[0]):
            structure.update(f"embedding:{name}|{tuple(shape)};".encode())
            values["embedding"].append(sample.detach().reshape(-1).to("cpu", torch.float32))
    out: dict[str, Any] = {"version": version, "structure": "sha256:" + structure.hexdigest()}
    if quantized:
        out["weight_quantized"] = True
    for kind, parts in values.items():
        flat = torch.cat(parts) if parts else torch.zeros(0)
        sketch = (_signs(kind, flat.numel()) @ flat).tolist() if flat.numel() else [0.0] * SKETCH_SIZE
        out[f"{kind}_sketch"] = [float(f"{v:.7g}") for v in sketch]
        out[f"{kind}_norm"] = float(f"{float(flat.double().norm()):.7g}")
    return out


def check_stored(stored: Any) -> None:
    """Refuse a stored fingerprint whose numbers are not finite and bounded (``1e30`` or ``inf`` norms would widen
    the tolerance to anything), or whose sketches are not :data:`SKETCH_SIZE` numbers."""
    if stored is None or isinstance(stored, str):
        return
    problem = None
    version = stored.get("version") if isinstance(stored, dict) else None
    if version not in KINDS or not isinstance(stored.get("structure"), str):
        problem = "must be a fingerprint object (version 2 or 3) or a 0.1.0 'sha256:' string"
    else:
        for kind in KINDS[version]:
            norm, sketch = stored.get(f"{kind}_norm"), stored.get(f"{kind}_sketch")
            numbers = [norm, *sketch] if isinstance(sketch, list) and len(sketch) == SKETCH_SIZE else None
            if numbers is None or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_NORM
                    for v in numbers) or norm < 0:
                problem = f"its {kind} norm or sketch is not {SKETCH_SIZE + 1} finite numbers within +-{MAX_NORM:g}"
                break
    if problem:
        raise BitFitError(
            f"BitFitConfig.base_fingerprint: {problem} ({describe(stored)}). Remove it from adapter_config.json to "
            "skip the check, or re-save the adapter."
        )


def matches(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether the stored fingerprint ``expected`` describes the base whose fingerprint is ``actual`` (any dtype of
    it). The tolerance scales with the model's own norms, which the stored norms must match."""
    if expected.get("structure") != actual.get("structure") or expected.get("version") != actual.get("version"):
        return False
    try:
        quantized = expected.get("weight_quantized") is True or actual.get("weight_quantized") is True
        for kind in KINDS[int(actual["version"])]:
            norm = float(actual[f"{kind}_norm"])
            bound = (QUANTIZED_TOLERANCE if kind == "weight" and quantized else TOLERANCE) * norm + 1e-12
            if not abs(float(expected[f"{kind}_norm"]) - norm) <= bound:
                return False
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




def describe(fingerprint: str | Mapping[str, Any] | None) -> str:
    """A short, printable form (for error messages and model cards)."""
    if fingerprint is None:
        return "none"
    if isinstance(fingerprint, str):
        return fingerprint[:19] + "..."
    return str(fingerprint.get("structure", "?"))[:19] + "..."
