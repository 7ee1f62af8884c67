"""What BitFit knows about the base modules it wraps: their bias shape, feature counts, whether their op takes a bias.

Example:
    >>> from torch import nn
    >>> bias_shape(nn.Linear(4, 3, bias=False)), can_merge_into(nn.Linear(4, 3, bias=False))
    ((3,), True)
    >>> in_out_features(nn.LayerNorm(8), (8,))
    (8, 8)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

try:  # PEFT's own rule (Linear, ConvNd, Conv1D, quantized/parallel linears, ...), as its LoRA/LN-tuning layers use
    from peft.tuners.tuners_utils import _get_in_out_features
except ImportError:  # pragma: no cover - private helper; fall back to the bias shape
    _get_in_out_features = None

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: base layer types whose own op takes the bias, so the fast path can pass ``base + delta`` straight in.
FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, *CONV_TYPES, nn.LayerNorm, nn.GroupNorm)


def bias_shape(base: nn.Module) -> tuple[int, ...]:
    """Shape of the bias vector a supported module has or would have."""
    bias = getattr(base, "bias", None)
    if isinstance(bias, torch.Tensor):
        return tuple(bias.shape)
    if isinstance(base, nn.Linear):
        return (base.out_features,)
    if isinstance(base, Conv1D):
        return (base.nf,)
    if isinstance(base, CONV_TYPES):
        return (base.out_channels,)
    if isinstance(base, nn.LayerNorm):
        return tuple(base.normalized_shape)
    if isinstance(base, nn.GroupNorm):
        return (base.num_channels,)
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # RMSNorm-like
        return tuple(weight.shape)
    raise TypeError(
        f"BitFit cannot tell the bias shape of {type(base).__name__}; target only Linear, Conv1D, ConvNd or "
        "LayerNorm-like modules (use exclude_modules to skip this one)."
    )


def in_out_features(base: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base module, as PEFT's tuner layers expose them.

    PEFT's rule where it knows the module type; norms (and anything else it does not know) map ``n -> n``
    features, ``n`` being the size of the bias vector.
    """
    in_features = out_features = None
    weight = getattr(base, "weight", None)
    is_norm = isinstance(base, (nn.LayerNorm, nn.GroupNorm)) or (isinstance(weight, torch.Tensor) and weight.dim() == 1)
    if _get_in_out_features is not None and not is_norm:  # (PEFT warns on norms, which it does not know)
        try:
            in_features, out_features = _get_in_out_features(base)
        except Exception:  # e.g. a module type PEFT refuses; the bias shape still tells the feature count
            in_features = out_features = None
    if in_features is None or out_features is None:
        n = 1
        for size in shape:
            n *= int(size)
        in_features = out_features = n
    return int(in_features), int(out_features)


def can_merge_into(base: nn.Module) -> bool:
    """Whether the module's own forward uses a ``bias`` attribute (so a created bias takes effect)."""
    if getattr(base, "bias", None) is not None:
        return True
    return isinstance(base, FUSED_TYPES)


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an Accelerate hook on ``module`` runs it on (None when no hook says so)."""
    hook = module.__dict__.get("_hf_hook")
    for part in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        device = getattr(part, "execution_device", None)
        if device is not None:
            return device if isinstance(device, torch.device) else torch.device(device)
    return None
