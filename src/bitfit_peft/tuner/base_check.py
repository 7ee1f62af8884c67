"""Does this model match the base an adapter was trained on? The model-side half of the base fingerprint.

:mod:`bitfit_peft.files.fingerprint` computes and compares fingerprints from plain tensors; this module reads those
tensors off a (partly wrapped, possibly offloaded) model and turns a mismatch into the load error.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> entries = module_entries(model, ["0"])
    >>> entries[0][0], entries[0][1]
    ('0', (2,))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bitfit_peft.compat.quantized import weight_sample
from bitfit_peft.errors import BitFitError
from bitfit_peft.files.fingerprint import (
    EMBEDDING_SAMPLE,
    LEGACY_WEIGHT_SAMPLE,
    VERSION,
    WEIGHT_SAMPLE,
    Embedding,
    Entry,
    check_stored,
    compute,
    describe,
    legacy_fingerprint,
    matches,
    relative_name,
    sample_positions,
)
from bitfit_peft.tuner.base_modules import bias_shape
from bitfit_peft.tuner.layer import BitFitLayer


class OffloadedValuesUnavailable(RuntimeError):
    """An offloaded parameter's values cannot be read (PEFT removed Accelerate's hooks before injection)."""


def _materialize(module: nn.Module, tensor: Any, attr: str) -> torch.Tensor | None:
    """Real values of a parameter, also when Accelerate offloaded it (meta tensor + weights_map)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
        return tensor if isinstance(tensor, torch.Tensor) else None
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is not None and attr in weights_map:
        return weights_map[attr]
    raise OffloadedValuesUnavailable(
        f"the {attr} of a {type(module).__name__} is offloaded (meta) with no weights map to read it from"
    )


def module_entries(model: nn.Module, names: Iterable[str], version: int = VERSION) -> list[Entry]:
    """``(name, bias shape, original bias, weight sample)`` of the modules ``names`` of a (partly wrapped) model."""
    return _entries(model, names, version)[0]


def _entries(model: nn.Module, names: Iterable[str], version: int) -> tuple[list[Entry], bool]:
    """:func:`module_entries`, and whether any weight sample was dequantized (a quantized base). Format 3 samples
    each weight across the whole tensor, older formats its first values."""
    entries, quantized = [], False
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, BitFitLayer):
            base, shape, bias = module.get_base_layer(), module.bias_shape, module.original_bias()
        else:
            base, shape, bias = module, bias_shape(module), getattr(module, "bias", None)
        weight = _materialize(base, getattr(base, "weight", None), "weight")
        sample, dequantized = None, False
        if weight is not None:
            index = sample_positions(relative_name(name), _numel(base, weight), WEIGHT_SAMPLE) if version >= 3 else None
            sample, dequantized = weight_sample(base, weight, LEGACY_WEIGHT_SAMPLE if index is None and version < 3
                                                else WEIGHT_SAMPLE, index)
        quantized = quantized or dequantized
        entries.append((relative_name(name), tuple(shape), _materialize(base, bias, "bias"), sample))
    return entries, quantized


def _numel(module: nn.Module, weight: torch.Tensor) -> int:
    """Values of the (possibly 4-bit packed) weight, as the layer sees them."""
    state = getattr(weight, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else weight.numel()


def embedding_entries(model: nn.Module) -> list[Embedding]:
    """``(name, shape, sample)`` of every embedding matrix of the base (not the adapter's copies of heads)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or ".modules_to_save." in f".{name}.":
            continue
        weight = _materialize(module, module.weight, "weight")
        if weight is None or weight.device.type == "meta":
            continue
        rel = relative_name(name)
        index = sample_positions(rel, weight.numel(), EMBEDDING_SAMPLE)
        flat = weight.detach().reshape(-1)
        out.append((rel, tuple(weight.shape), flat if index is None else flat[index.to(flat.device)]))
    return out


def _fingerprint(model: nn.Module, names: Iterable[str], version: int) -> dict[str, Any]:
    entries, quantized = _entries(model, names, version)
    embeddings = embedding_entries(model) if version >= 3 else None
    return compute(entries, quantized=quantized, embeddings=embeddings, version=version)


def base_fingerprint(model: nn.Module, names: Iterable[str]) -> dict[str, Any]:
    """The fingerprint of the modules ``names`` of ``model`` (what a save stores in the adapter config)."""
    return _fingerprint(model, names, VERSION)


def base_matches(config: Any, model: nn.Module, names: Iterable[str]) -> bool:
    """Whether the modules ``names`` of ``model`` match the base fingerprint stored in ``config``.

    True when there is nothing to check (no fingerprint, or a config marked by ``allow_base_mismatch``) and, with
    a warning, when offloaded values cannot be read. A stored fingerprint with unbounded numbers raises."""
    stored = getattr(config, "base_fingerprint", None)
    if stored is None or getattr(config, "_skip_fingerprint", False):
        return True
    check_stored(stored)
    try:
        if isinstance(stored, str):
            return legacy_fingerprint(module_entries(model, names, version=1)) == stored
        return matches(stored, _fingerprint(model, names, int(stored["version"])))
    except OffloadedValuesUnavailable as err:
        warnings.warn(f"Base fingerprint not checked: {err}", stacklevel=3)
        return True


def other_base_error(adapter_name: str, stored: str | Mapping[str, Any] | None) -> Exception:
    """The load error for an adapter whose fingerprint ``stored`` does not match the model."""
    return BitFitError(
        f"Adapter {adapter_name!r} was trained on a different base model: its fingerprint {describe(stored)} does "
        "not match this model (names, shapes or original values of the targeted modules differ). Load it onto the "
        "base it was trained on, or pass `bitfit_peft.allow_base_mismatch(config)` to apply it anyway."
    )
