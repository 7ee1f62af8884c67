"""Low-memory training mode: frozen base in bf16/fp16, BitFit deltas (and trainable heads) in fp32."""

from __future__ import annotations

import torch
from torch import nn


def cast_frozen_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store every frozen floating-point parameter and buffer of ``model`` in ``dtype``, in place.

    Trainable parameters (the BitFit deltas, a classifier head) stay in their dtype (fp32), so the optimizer
    state and updates keep full precision; the forward casts the effective bias to the compute dtype.
    Call it after ``get_peft_model`` and run the forward under ``torch.autocast`` (CUDA or CPU, same dtype): a
    trainable fp32 head fed bf16 activations needs autocast to run.

    Example:
        >>> import torch, bitfit_peft
        >>> from peft import get_peft_model
        >>> m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), bitfit_peft.BitFitConfig())
        >>> _ = cast_frozen_base(m)
        >>> m.base_model.model[0].base_layer.weight.dtype, m.base_model.model[0].delta_of("default").dtype
        (torch.bfloat16, torch.float32)
    """
    if not dtype.is_floating_point:
        raise ValueError(f"cast_frozen_base needs a floating dtype, got {dtype}.")
    for module in model.modules():
        for param in list(module.parameters(recurse=False)):
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype and "bitfit" not in name:
                module._buffers[name] = buf.to(dtype)
    return model
