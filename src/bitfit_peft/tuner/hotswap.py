"""Hot-swap a loaded BitFit adapter: new values copied into the existing Parameters, so nothing recompiles.

PEFT's ``peft.utils.hotswap.hotswap_adapter`` supports LoRA only (it refuses a BitFit model with a ``ValueError``).
:func:`hotswap_adapter` is its BitFit counterpart, with the same signature. It reads the new adapter through the
strict, read-only load path (``PeftConfig.from_pretrained``, ``load_peft_weights``,
:func:`~bitfit_peft.files.delta_format.from_legacy`,
:func:`~bitfit_peft.files.delta_format.check_adapter_state_dict`), checks everything first (type, targets, heads,
keys, shapes, finite values, base fingerprint), and only then copies the deltas and ``modules_to_save``
tensors in place under ``torch.no_grad()`` (through
:meth:`~bitfit_peft.tuner.model.BitFitModel.replace_adapter_values`). A refused swap changes nothing.

Because the Parameters stay the same objects, a compiled model serves the new values without
recompiling: load adapter A, compile, call it, hot-swap B into A's name, and the next call gives B's outputs from the
same compiled code (``tests/test_hotswap.py`` checks it with ``error_on_recompile``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.utils import ModulesToSaveWrapper
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from bitfit_peft.errors import BitFitError
from bitfit_peft.files import delta_format, fingerprint
from bitfit_peft.files.validate import check_adapter_folder, local_adapter_folder
from bitfit_peft.names import PEFT_PREFIX
from bitfit_peft.tuner.base_check import base_matches
from bitfit_peft.tuner.config import BitFitConfig
from bitfit_peft.tuner.layer import BitFitLayer, expected_tensors
from bitfit_peft.tuner.model import BitFitModel

#: config fields that describe the loaded adapter's runtime state, not the file: kept on a swap
_KEPT_FIELDS = ("inference_mode", "modules_to_save")


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace the values of the loaded BitFit adapter ``adapter_name`` with those saved at ``model_name_or_path``.

    Args:
        model: a ``PeftModel`` holding a BitFit adapter, possibly ``torch.compile``\\ d (or with a compiled base).
        model_name_or_path: local directory or Hub id of the new adapter (same targets and head shapes).
        adapter_name: the loaded adapter to overwrite; it keeps its name.
        torch_device: where to read the new tensors (default: the adapter's device).
        **kwargs: Hub / loading options (``revision``, ``subfolder``, ``token``, ``cache_dir``...), as for PEFT;
            ``config=bitfit_peft.allow_base_mismatch(cfg)`` uses ``cfg`` and skips the base fingerprint check.

    Raises:
        BitFitError: the new adapter cannot replace the loaded one in place (nothing was changed).

    Example:
        >>> import copy, tempfile, torch, bitfit_peft
        >>> from peft import get_peft_model
        >>> base, path = torch.nn.Sequential(torch.nn.Linear(4, 4)), tempfile.mkdtemp()
        >>> get_peft_model(copy.deepcopy(base), bitfit_peft.BitFitConfig(init_weights=False)).save_pretrained(path)
        >>> model = get_peft_model(base, bitfit_peft.BitFitConfig())
        >>> bitfit_peft.hotswap_adapter(model, path, "default", torch_device="cpu")
        >>> bool(model.base_model.model[0].bitfit_delta["default"].abs().sum() > 0)
        True
    """
    peft_model = _unwrap(model)
    tuner = peft_model.base_model
    if not isinstance(peft_model, PeftModel) or not isinstance(tuner, BitFitModel):
        raise BitFitError(f"hotswap_adapter needs a PeftModel with a BitFit adapter, got {type(model).__name__}.")
    if adapter_name not in peft_model.peft_config:
        raise BitFitError(f"No adapter {adapter_name!r} to hot-swap; loaded: {sorted(peft_model.peft_config)}.")
    where = f"adapter {adapter_name!r} with {model_name_or_path!r}"
    layers = {n: la for n, la in tuner.model.named_modules() if isinstance(la, BitFitLayer)}
    holding = {n for n, la in layers.items() if adapter_name in la.bitfit_delta}
    if any(adapter_name in la.merged_adapters for la in layers.values()):
        raise BitFitError(f"Cannot hot-swap {where}: it is merged into the base; call unmerge_adapter() first.")
    if torch_device is None:
        torch_device = next((layers[n].delta_of(adapter_name).device for n in sorted(holding)), "cpu")

    # ---------------------------------------------------------------- read (nothing changes until every check passed)
    config = kwargs.pop("config", None)
    deltas, heads = expected_tensors(peft_model, adapter_name)
    folder = local_adapter_folder(model_name_or_path, kwargs.get("subfolder"))
    if folder is not None:  # the one file-level check of every load path (a Hub id: keys checked when read)
        check_adapter_folder(folder, max_tensors=2 * len(deltas) + len(heads) + 1)
    if config is None:
        config = _read(where, lambda: PeftConfig.from_pretrained(model_name_or_path, **kwargs))
    if not isinstance(config, BitFitConfig):
        kind = getattr(getattr(config, "peft_type", None), "value", type(config).__name__)
        raise _refused(where, f"it is a {kind} adapter, not BitFit")
    old = peft_model.peft_config[adapter_name]
    targets = tuner.resolve_targets(tuner.model, config)
    if set(targets) != holding:
        extra, gone = sorted(set(targets) - holding), sorted(holding - set(targets))
        raise _refused(where, f"other targets ({len(extra)} new, e.g. {extra[:2]}; {len(gone)} gone, e.g. {gone[:2]})")
    if set(config.modules_to_save or ()) != set(old.modules_to_save or ()):
        raise _refused(where, f"other modules_to_save ({config.modules_to_save} vs loaded {old.modules_to_save})")
    _check_base(where, config, tuner.model, sorted(targets))
    state_dict = _read(where, lambda: delta_format.from_legacy(
        load_peft_weights(model_name_or_path, device=str(torch_device), **kwargs), str(model_name_or_path)))
    remapped = _to_model_keys(peft_model, adapter_name, state_dict)
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(heads[k].shape)}"
        for k, v in remapped.items()
        if k in heads and v.shape != heads[k].shape
    ]
    if shapes:
        raise _refused(where, f"other head shapes ({shapes[:2]})")
    missing_heads = sorted(set(heads) - set(remapped))
    if missing_heads:
        raise _refused(where, f"{len(missing_heads)} head tensor(s) missing from the file (e.g. {missing_heads[:2]})")
    if config.prune_tolerance is not None:
        remapped = delta_format.fill_pruned(remapped, deltas)  # pruned deltas swap in as zeros
    try:
        delta_format.check_adapter_state_dict(remapped, adapter_name, deltas, heads)
    except BitFitError as err:
        raise _refused(where, str(err).split(": ", 1)[-1].split(". The model is unchanged")[0]) from err
    for name in _KEPT_FIELDS:  # the stored config is the new adapter's (not an edit of one PEFT may share)
        setattr(config, name, getattr(old, name))

    # ---------------------------------------------------------------- swap in place (same Parameter objects)
    tuner.replace_adapter_values(adapter_name, config, {k.removeprefix(PEFT_PREFIX): v for k, v in remapped.items()})


def _unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(...)`` wrappers."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _read(where: str, read: Callable[[], Any]) -> Any:
    """``read()``, any failure of it one :class:`BitFitError` (a corrupt file, a missing Hub repo, bad JSON...)."""
    try:
        return read()
    except BitFitError:
        raise
    except Exception as err:  # noqa: BLE001 - PEFT / safetensors / the OS fail in many ways: one message
        raise _refused(where, f"it cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err


def _refused(where: str, what: str) -> BitFitError:
    return BitFitError(
        f"Cannot hot-swap {where}: {what}. Nothing was changed; load it with a full `load_adapter` instead."
    )


def _check_base(where: str, config: BitFitConfig, model: nn.Module, names: list[str]) -> None:
    """The new adapter's base fingerprint must match the model, unless ``allow_base_mismatch`` marked the config."""
    if not base_matches(config, model, names):
        raise BitFitError(
            f"Cannot hot-swap {where}: it was trained on a different base model (fingerprint "
            f"{fingerprint.describe(config.base_fingerprint)}). Nothing was changed; pass "
            "`config=bitfit_peft.allow_base_mismatch(config)` to apply it anyway."
        )


def _to_model_keys(model: PeftModel, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """Checkpoint keys -> model keys, as ``BitFitModel._remap_adapter_state_dict_for_load`` (heads: PEFT's map)."""
    deltas, _ = expected_tensors(model, adapter_name)
    mapping = {BitFitModel._remove_adapter_name_from_key(key, adapter_name): key for key in deltas}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
                mapping[f"{name}.{saved}"] = f"{name}.{loaded}"
    return {mapping.get(key, key): value for key, value in state_dict.items()}
