"""Reading quantized base weights (bitsandbytes 4-bit and 8-bit) without changing them.

The one place that knows bitsandbytes' weight layouts. The base fingerprint samples the first values of each
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
import math

import torch
from torch import nn


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds quantized values (bitsandbytes ``Params4bit`` / ``Int8Params``, or any non-float)."""
    return getattr(weight, "quant_state", None) is not None or not weight.is_floating_point()


def weight_sample(module: nn.Module, weight: torch.Tensor, n: int) -> tuple[torch.Tensor | None, bool]:
    """The first ``n`` values of ``module``'s ``weight`` (row-major) as floats, and whether they were dequantized.

    bitsandbytes 4-bit weights are dequantized from their canonical layout (a CPU-packed weight is unpacked into
    a copy first); 8-bit weights are scaled by their row statistics. A quantized type this module does not know
    gives ``(None, True)``: no values to compare.
    """
    if not is_quantized(weight):
        return weight.detach().reshape(-1)[:n], False
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        return _four_bit_sample(weight, quant_state, n), True
    scale = getattr(weight, "SCB", None)
    if scale is None:  # Linear8bitLt moves the row statistics to its state on the first forward
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if isinstance(scale, torch.Tensor) and weight.dim() == 2:  # LLM.int8(): W = CB * SCB[row] / 127
        rows = min(weight.shape[0], math.ceil(n / max(weight.shape[1], 1)))
        values = weight.data[:rows].float() * (scale[:rows].float().unsqueeze(1) / 127.0)
        return values.reshape(-1)[:n], True
    return None, True


def _four_bit_sample(weight: torch.Tensor, quant_state: object, n: int) -> torch.Tensor:
    # deferred: bitsandbytes is optional, and only a 4-bit base (which needs it) gets here
    import bitsandbytes.functional as bnb_functional

    data = weight.data  # a plain tensor: no bitsandbytes .to()/.detach() override runs
    if getattr(quant_state, "packing_format_for_cpu", False):  # the inverse rewrites the state it is given
        data, quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(quant_state))
    return bnb_functional.dequantize_4bit(data, quant_state).reshape(-1)[:n].float()
