"""BitFit on bases Accelerate dispatched with modules offloaded to CPU or disk (``device_map`` + ``offload_folder``).

The deltas are tiny, so they never need offloading: each lives in memory on the *execution device* of the hooked
base module (the device its ``AlignDevicesHook`` computes on), while the base weights stay where the dispatch put
them (on ``meta`` with a weights map, for offloaded modules). The wrapper calls the hooked base module, whose hook
loads its weights for the call, then adds the delta.

``PeftModel.from_pretrained`` / ``load_adapter`` with no dispatch arguments would instead strip every Accelerate
hook from such a base (losing the weights maps, so the fingerprint cannot read the offloaded values) and re-dispatch
it with ``device_map="auto"``, which on a machine whose memory holds the model means one device: ``model.to(...)``
on the ``meta`` weights fails with "Cannot copy out of meta tensor". :func:`kept_dispatch` keeps the base's own
dispatch for BitFit loads (see ``_compat``, entry 2); with explicit dispatch arguments PEFT re-dispatches as asked.

Example:
    >>> import torch
    >>> is_offload_dispatched(torch.nn.Linear(2, 2))  # not dispatched
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from peft import PeftConfig
from torch import nn

from bitfit_peft.names import is_bitfit

#: arguments that ask PEFT to re-dispatch the model after loading (its own path, left as it is)
DISPATCH_KWARGS = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")
_DEVICE_MAP = "hf_device_map"



def _owner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_offload_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` (or the base of a ``PeftModel``) was dispatched with modules on ``"cpu"`` or ``"disk"``."""
    device_map = _owner(model).__dict__.get(_DEVICE_MAP)
    return isinstance(device_map, dict) and bool({"cpu", "disk"} & {str(d) for d in device_map.values()})


def keeps_dispatch(model: nn.Module, kwargs: dict) -> bool:
    """Whether a load with ``kwargs`` onto ``model`` should keep the model's dispatch (no dispatch arguments)."""
    return is_offload_dispatched(model) and all(kwargs.get(k) is None for k in DISPATCH_KWARGS)


@contextlib.contextmanager
def kept_dispatch(model: nn.Module) -> Iterator[None]:
    """Hide the base's ``hf_device_map`` from PEFT for the duration of a load, so PEFT neither removes the offload
    hooks nor re-dispatches; it is put back whatever happens (the dispatched model is left as it was)."""
    owner = _owner(model)
    device_map = owner.__dict__.pop(_DEVICE_MAP)
    try:
        yield
    finally:
        owner.__dict__[_DEVICE_MAP] = device_map


def source_is_bitfit(model_id: Any, kwargs: dict) -> bool:
    """Whether ``PeftModel.from_pretrained(model, model_id, **kwargs)`` loads a BitFit adapter (config read as PEFT
    reads it; anything unreadable is not ours, and PEFT reports it as it would)."""
    config = kwargs.get("config")
    if config is not None:
        return is_bitfit(config)
    hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if kwargs.get(k) is not None}
    try:
        return is_bitfit({"peft_type": PeftConfig._get_peft_type(str(model_id), **hub_kwargs)})
    except Exception:  # noqa: BLE001 - not readable: PEFT's own error follows
        return False
