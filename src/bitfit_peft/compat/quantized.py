"""Quantized bases (bitsandbytes 4-bit / 8-bit, torchao): the ``--quantize`` schemes, and reading weights unchanged.

The one place that knows the quantization libraries' options and weight layouts. :func:`quantization_config` turns
a scheme name (``nf4``, ``fp4``, ``int8``, ``torchao-int8``) into the config that ``bitfit-peft train`` / ``serve``
load the base with. The base fingerprint samples the first values of each
targeted module's weight; on a quantized base those must be the *dequantized* values, read in a way that does
not depend on the layout bitsandbytes keeps them in at the moment. (On a CPU with AVX512-BF16, bitsandbytes 0.50
repacks a 4-bit weight on its first no-grad forward and unpacks it, lossily, on ``state_dict()``: the raw bytes of
a 4-bit weight change over the model's life.) Nothing here writes to the module.

Example:
    >>> import torch
    >>> linear = torch.nn.Linear(4, 2)
    >>> sample, quantized = weight_sample(linear, linear.weight, 3)
    >>> torch.equal(sample, linear.weight.detach().reshape(-1)[:3]), quantized
    (True, False)
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig, TorchAoConfig

from bitfit_peft.errors import BitFitError
from bitfit_peft.names import QUANT_SCHEMES

#: ``--quantize`` scheme -> (the package it needs, its ``from_pretrained`` quantization config)
SCHEMES: dict[str, tuple[str, Callable[[], Any]]] = {
    "nf4": ("bitsandbytes", lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=_compute()
    )),
    "fp4": ("bitsandbytes", lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=_compute()
    )),
    "int8": ("bitsandbytes", lambda: BitsAndBytesConfig(load_in_8bit=True)),
    "torchao-int8": ("torchao", lambda: TorchAoConfig(_torchao().Int8WeightOnlyConfig())),
}  # fmt: skip
if tuple(SCHEMES) != QUANT_SCHEMES:  # pragma: no cover - one list of names (light, for the CLI) and its builders
    raise RuntimeError("bitfit_peft.names.QUANT_SCHEMES and compat.quantized.SCHEMES differ")


def _compute() -> torch.dtype:
    """bitsandbytes 4-bit compute dtype: bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _torchao() -> Any:
    # deferred: torchao is optional, and only its scheme gets here
    import torchao.quantization

    return torchao.quantization


def quantization_config(scheme: str | None) -> Any:
    """The quantization config of a scheme name (None: no quantization); a one-line error when unavailable.

    Example:
        >>> quantization_config("nf4").bnb_4bit_quant_type, quantization_config(None)
        ('nf4', None)
    """
    if scheme is None:
        return None
    if scheme not in SCHEMES:
        raise BitFitError(f"Unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}.")
    package, make = SCHEMES[scheme]
    if importlib.util.find_spec(package) is None:
        raise BitFitError(f"Quantizing the base ({scheme}) needs {package}: pip install {package}.")
    return make()


def device_map(device: torch.device | str | None = None) -> dict[str, int | str]:
    """Where ``from_pretrained`` puts a quantized base (it cannot be moved with ``.to()`` afterwards)."""
    if device is not None:
        return {"": str(device)}
    return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else {"": "cpu"}


def _own_dequantize(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a tensor subclass with its own ``dequantize`` (torchao's quantized tensors)."""
    return getattr(type(weight), "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize


def weight_sample(
    module: nn.Module, weight: torch.Tensor, n: int, index: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, bool]:
    """The first ``n`` values of ``module``'s ``weight`` (row-major) as floats, or with ``index`` the values at those
    flat positions, and whether they were dequantized.

    bitsandbytes 4-bit weights are dequantized from their canonical layout (a CPU-packed weight is unpacked into
    a copy first; one weight at a time, as large as the weight); 8-bit weights are scaled by their row statistics
    (only the sampled values are read); torchao tensors use their ``dequantize()``. A quantized type this module does
    not know gives ``(None, True)``: no values to compare.
    """

    def pick(flat: torch.Tensor) -> torch.Tensor:
        return flat[:n] if index is None else flat[index.to(flat.device)]

    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        return pick(_four_bit_values(weight, quant_state)).float(), True
    if _own_dequantize(weight):
        return pick(weight.dequantize().reshape(-1)).float(), True
    if weight.is_floating_point():
        return pick(weight.detach().reshape(-1)), False
    scale = getattr(weight, "SCB", None)
    if scale is None:  # Linear8bitLt moves the row statistics to its state on the first forward
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if isinstance(scale, torch.Tensor) and weight.dim() == 2:  # LLM.int8(): W = CB * SCB[row] / 127
        cols = max(weight.shape[1], 1)
        if index is None:
            rows = min(weight.shape[0], math.ceil(n / cols))
            values = weight.data[:rows].float() * (scale[:rows].float().unsqueeze(1) / 127.0)
            return values.reshape(-1)[:n], True
        at = index.to(weight.device)
        return weight.data.reshape(-1)[at].float() * (scale[at // cols].float() / 127.0), True
    return None, True


def _four_bit_values(weight: torch.Tensor, quant_state: object) -> torch.Tensor:
    # deferred: bitsandbytes is optional, and only a 4-bit base (which needs it) gets here
    import bitsandbytes.functional as bnb_functional

    data = weight.data  # a plain tensor: no bitsandbytes .to()/.detach() override runs
    if getattr(quant_state, "packing_format_for_cpu", False):  # the inverse rewrites the state it is given
        data, quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(quant_state))
    return bnb_functional.dequantize_4bit(data, quant_state).reshape(-1)
