"""Where one adapter *layout* puts its tensors in the served model, and reading an adapter file against it.

A layout is an adapter config apart from its base fingerprint: adapters trained with the same ``BitFitConfig``
share one. The engine learns a layout from the first adapter of it that PEFT loads (:func:`capture_layout`, one walk
of the model) and then reads and checks later adapters of that layout without touching the model
(:func:`read_for_layout`): keys and shapes from the safetensors header first, then the values (float, finite).
Heads may differ from the base's head in the number of labels only (the first dimension of the output layer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from torch import nn

from bitfit_peft.errors import BitFitError
from bitfit_peft.files.delta_format import MAX_LISTED, is_legacy
from bitfit_peft.names import DELTA_KEY, PEFT_PREFIX
from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.heads_shape import last_linear, sync_linear_sizes
from bitfit_peft.tuner.layer import BitFitLayer

__all__ = ["Layout", "capture_layout", "read_for_layout"]


@dataclass
class Layout:
    """Where the tensors of one adapter layout live in the served model (learnt from a load through PEFT)."""

    deltas: dict[str, BitFitLayer]  #: file key (``base_model.model.<module>.bitfit_delta``) -> layer
    head_params: dict[str, tuple[ModulesToSaveWrapper, str, tuple[int, ...], bool]]  #: file key -> (wrapper,
    #: tensor path inside the head, original shape, whether its first dim may differ: the output layer's)
    wrappers: list[ModulesToSaveWrapper]
    targets: set[str]
    devices: dict[BitFitLayer, torch.device]


def capture_layout(model: nn.Module, internal: str) -> Layout:
    """Where PEFT put the tensors of ``internal`` (one walk of the model, once per layout)."""
    deltas: dict[str, BitFitLayer] = {}
    head_params: dict[str, tuple[ModulesToSaveWrapper, str, tuple[int, ...], bool]] = {}
    wrappers: list[ModulesToSaveWrapper] = []
    targets: set[str] = set()  #: module names (as the tuner names them: without PEFT's prefix) of the deltas
    for name, module in model.named_modules():
        if isinstance(module, BitFitLayer) and internal in module.bitfit_delta:
            deltas[f"{name}.{DELTA_KEY}"] = module
            targets.add(name.removeprefix(PEFT_PREFIX))
        elif isinstance(module, ModulesToSaveWrapper) and internal in module.modules_to_save:
            wrappers.append(module)
            original = module.original_module
            output = last_linear(original)
            out_names = {n for n, _ in output[1].named_parameters()} if output else set()
            prefix = output[0] + "." if output and output[0] else ""
            for path, tensor in original.state_dict().items():
                flexible = path.startswith(prefix) and path[len(prefix):] in out_names
                head_params[f"{name}.{path}"] = (module, path, tuple(tensor.shape), flexible)
    devices = {layer: layer.delta_of(internal).device for layer in deltas.values()}
    return Layout(deltas, head_params, wrappers, targets, devices)


def read_for_layout(
    file: Path, layout: Layout, config: Any
) -> tuple[dict[BitFitLayer, nn.Parameter], dict[ModulesToSaveWrapper, nn.Module]] | None:
    """Read and check an adapter file against a known layout: keys and shapes from the header first, then values.

    None for a bitfit-peft 0.1.0 file (stacked tensors), which PEFT's load path converts."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            if is_legacy(dict.fromkeys(keys)):
                return None
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            problems = _layout_problems(keys, shapes, layout, config)
            if problems:
                raise BitFitError(
                    f"This BitFit adapter does not fit this model: {'; '.join(problems)}. The engine is unchanged. "
                    "Load the adapter onto the base model (and config) it was trained with, or re-save it."
                )
            tensors = {k: handle.get_tensor(k) for k in keys}
    except SafetensorError as err:
        raise EngineError(f"{file} is corrupt or truncated ({err}); re-save or re-download the adapter.") from err
    bad = [k for k, t in tensors.items() if not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if bad:
        raise BitFitError(f"This BitFit adapter has non-float or NaN/Inf tensors ({sorted(bad)[:MAX_LISTED]}); the "
                          "engine is unchanged. Re-train or re-save the adapter.")
    deltas = _packed_deltas(layout, tensors)
    heads: dict[ModulesToSaveWrapper, nn.Module] = {}
    for key, (wrapper, path, _, _) in layout.head_params.items():
        head = heads.get(wrapper)
        if head is None:
            head = heads[wrapper] = copy.deepcopy(wrapper.original_module).requires_grad_(False).eval()
        owner_path, _, attr = path.rpartition(".")
        owner = head.get_submodule(owner_path)
        old = getattr(owner, attr)
        new = tensors[key].to(device=old.device, dtype=old.dtype, copy=True)  # never a view of the mapped file
        setattr(owner, attr, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)
    for head in heads.values():
        sync_linear_sizes(head)
    return deltas, heads


def _layout_problems(keys: set[str], shapes: dict[str, tuple[int, ...]], layout: Layout, config: Any) -> list[str]:
    problems = []
    unexpected = sorted(k for k in keys if k not in layout.deltas and k not in layout.head_params)
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) that are neither a delta of a targeted module nor a "
                        f"modules_to_save tensor of the config (e.g. {unexpected[:MAX_LISTED]})")
    missing = sorted(set(layout.deltas) - keys)
    if missing and config.prune_tolerance is None:
        problems.append(f"{len(missing)} delta(s) missing from the file (e.g. {missing[:MAX_LISTED]})")
    missing_heads = sorted(set(layout.head_params) - keys)
    if missing_heads:
        problems.append(f"{len(missing_heads)} modules_to_save tensor(s) missing (e.g. {missing_heads[:MAX_LISTED]})")
    wrong = [f"{k}: file {shapes[k]} vs model {layer.bias_shape}" for k, layer in layout.deltas.items()
             if k in shapes and shapes[k] != tuple(layer.bias_shape)]
    outputs: dict[int, set[int]] = {}
    for key, (wrapper, _, shape, flexible) in layout.head_params.items():
        got = shapes.get(key)
        if got is None:
            continue
        if flexible and len(got) == len(shape) and got[1:] == shape[1:] and got[0] > 0:
            outputs.setdefault(id(wrapper), set()).add(got[0])
        elif got != shape:
            wrong.append(f"{key}: file {got} vs model {shape}")
    if any(len(sizes) > 1 for sizes in outputs.values()):
        wrong.append("the output layer's weight and bias disagree on the number of labels")
    if wrong:
        problems.append(f"shape mismatch: {wrong[:MAX_LISTED]}")
    return problems


def _packed_deltas(layout: Layout, tensors: dict[str, torch.Tensor]) -> dict[BitFitLayer, nn.Parameter]:
    """The adapter's fp32 deltas as views of ONE buffer per device: one allocation per adapter, not one per layer
    (with 10,000 adapters x 50 layers the per-tensor allocations would cost a third more than the values)."""
    by_device: dict[torch.device, list[tuple[str, BitFitLayer]]] = {}
    for key, layer in layout.deltas.items():
        by_device.setdefault(layout.devices[layer], []).append((key, layer))
    deltas: dict[BitFitLayer, nn.Parameter] = {}
    for device, members in by_device.items():
        sizes = [int(torch.Size(layer.bias_shape).numel()) for _, layer in members]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        offset = 0
        for (key, layer), size in zip(members, sizes, strict=True):
            view = flat[offset:offset + size].view(layer.bias_shape)
            value = tensors.get(key)
            if value is not None:  # else pruned at save time: zeros
                view.copy_(value.reshape(layer.bias_shape))
            deltas[layer] = nn.Parameter(view, requires_grad=False)
            offset += size
    return deltas

