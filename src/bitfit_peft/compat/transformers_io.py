"""transformers' own ``model.load_adapter(dir)`` for BitFit adapters: the file is checked before anything changes.

transformers reads adapter files itself and loads them past PEFT's ``set_peft_model_state_dict`` (so past the tuner's
``_remap_adapter_state_dict_for_load``, where PeftModel loads are checked). ``_compat`` entry 3 therefore reads the
file here, refuses any tensor that is not a delta of a targeted module or a ``modules_to_save`` tensor, and hands
transformers the checked state dict, with head keys already pointing at the adapter's copy (transformers 5.17 does
not map them itself).

Example:
    >>> # model.load_adapter("my-bitfit-adapter", adapter_name="sst2")  # after `import bitfit_peft`
"""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper
from peft.utils.save_and_load import load_peft_weights
from safetensors import SafetensorError
from torch import nn

from bitfit_peft.errors import BitFitError
from bitfit_peft.files import delta_format
from bitfit_peft.names import DELTA_KEY, PEFT_PREFIX
from bitfit_peft.tuner.base_modules import bias_shape
from bitfit_peft.tuner.layer import BitFitLayer
from bitfit_peft.tuner.model import BitFitModel


def head_modules(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """``{module name: module holding the original parameters}`` of the config's ``modules_to_save``."""
    wanted = [str(t) for t in (getattr(config, "modules_to_save", None) or [])]
    out = {}
    for name, module in model.named_modules():
        if ".modules_to_save." in f".{name}." or ".original_module" in f".{name}":
            continue
        if any(name == t or name.endswith("." + t) for t in wanted):
            out[name] = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
    return out


def expected_checkpoint(model: nn.Module, config: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """``(delta shapes, head tensors)`` keyed as in the file, for ``config`` on ``model`` (before injection)."""

    deltas = {}
    for name in BitFitModel.resolve_targets(model, config):
        module = model.get_submodule(name)
        shape = module.bias_shape if isinstance(module, BitFitLayer) else bias_shape(module)
        deltas[f"{PEFT_PREFIX}{name}.{DELTA_KEY}"] = tuple(shape)
    heads = {
        f"{PEFT_PREFIX}{name}.{key}": tensor
        for name, module in head_modules(model, config).items()
        for key, tensor in module.state_dict().items()
    }
    return deltas, heads


def read_checked_state_dict(
    model: nn.Module, model_id: Any, config: Any, adapter_name: str | None, hub_kwargs: dict
) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked against ``config`` on ``model`` and keyed for transformers' loader."""
    adapter_name = adapter_name or "default"
    deltas, heads = expected_checkpoint(model, config)
    try:
        weights = delta_format.from_legacy(load_peft_weights(str(model_id), device="cpu", **hub_kwargs), str(model_id))
    except BitFitError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, RecursionError) as err:
        raise BitFitError(
            f"{model_id}: the adapter weights cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            "; re-save or re-download it. The model is unchanged."
        ) from err
    if getattr(config, "prune_tolerance", None) is not None:
        weights = delta_format.fill_pruned(weights, deltas)
    delta_format.check_adapter_state_dict(weights, adapter_name, deltas, heads)
    head_names = sorted(head_modules(model, config), key=len, reverse=True)
    out = {}
    for key, value in weights.items():
        head = next((h for h in head_names if key.startswith(f"{PEFT_PREFIX}{h}.")), None)
        if head is not None:
            key = f"{PEFT_PREFIX}{head}.modules_to_save.{adapter_name}.{key.removeprefix(f'{PEFT_PREFIX}{head}.')}"
        out[key] = value
    return out
