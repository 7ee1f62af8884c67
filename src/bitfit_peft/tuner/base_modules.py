"""What BitFit knows about the base modules it wraps: their bias shape, feature counts, whether their op takes a bias.

Example:
    >>> from torch import nn
    >>> bias_shape(nn.Linear(4, 3, bias=False)), can_merge_into(nn.Linear(4, 3, bias=False))
    ((3,), True)
    >>> in_out_features(nn.LayerNorm(8), (8,))
    (8, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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


def new_bias(base: nn.Module, shape: tuple[int, ...]) -> nn.Parameter:
    """A zero, frozen bias for ``base``: its weight's dtype where that is a float, else float32.

    A quantized weight (bitsandbytes ``Params4bit`` is ``uint8``, ``Int8Params`` is ``int8``) must not set the
    bias dtype: a merged delta stored in it would be truncated. bitsandbytes casts a float bias to its compute
    dtype in the forward.
    """
    weight = getattr(base, "weight", None)
    floating = isinstance(weight, torch.Tensor) and weight.is_floating_point()
    dtype = weight.dtype if floating else torch.float32
    device = weight.device if isinstance(weight, torch.Tensor) else None
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


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


def _linear(base: nn.Linear, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    weight = base._parameters["weight"]
    return F.linear(x, weight, bias if bias.dtype == weight.dtype else bias.to(weight.dtype))


def _conv1d_hf(base: Conv1D, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    weight = base._parameters["weight"]
    bias = bias if bias.dtype == weight.dtype else bias.to(weight.dtype)
    return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(x.size()[:-1] + (base.nf,))


def _conv(base: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    weight = base._parameters["weight"]
    return base._conv_forward(x, weight, bias if bias.dtype == weight.dtype else bias.to(weight.dtype))


def _norm_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if bias.dtype == weight.dtype or (x.device.type == "cuda" and torch.is_autocast_enabled("cuda")):
        return bias  # CUDA autocast runs norms in fp32: the fp32 bias as is (no round trip through bf16)
    return bias.to(weight.dtype)


def _layer_norm(base: nn.LayerNorm, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    weight = base._parameters["weight"]
    return F.layer_norm(x, base.normalized_shape, weight, _norm_bias(x, weight, bias), base.eps)


def _group_norm(base: nn.GroupNorm, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    weight = base._parameters["weight"]
    return F.group_norm(x, base.num_groups, weight, _norm_bias(x, weight, bias), base.eps)


#: The op of each FUSED_TYPES type, called as ``op(base, x, bias)``. Each casts an fp32 delta to the weight's dtype
#: (one tiny cast; the gradient stays fp32).
_BIAS_OPS: dict[type[nn.Module], Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Linear: _linear,
    Conv1D: _conv1d_hf,
    **dict.fromkeys(CONV_TYPES, _conv),
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
}


def fused_op(base: nn.Module) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The base module's own op as ``op(base, x, bias)``, for running it with ``bias + delta`` as its bias (no extra
    kernel); None when the delta must be added after the module runs (other types, subclasses, norms without weight).

    Example:
        >>> linear = nn.Linear(2, 2)
        >>> torch.equal(fused_op(linear)(linear, torch.ones(1, 2), linear.bias), linear(torch.ones(1, 2)))
        True
        >>> fused_op(nn.LayerNorm(4, elementwise_affine=False)) is None
        True
    """
    if isinstance(base, (nn.LayerNorm, nn.GroupNorm)) and base.weight is None:
        return None
    return _BIAS_OPS.get(type(base))
