"""The BitFit adapter file: PEFT's own layout, plus a reader for the bitfit-peft 0.1.0 layout.

``adapter_model.safetensors`` holds exactly what PEFT's ``get_peft_model_state_dict`` gives a ParameterDict tuner
(as BEFT's files do): one tensor per adapted module under ``base_model.model.<module>.bitfit_delta``, plus the
``modules_to_save`` tensors (``base_model.model.<head>.<param>``). No stacking, no suffixes, no metadata of our own:
any PEFT tool, safetensors viewer or ``load_peft_weights`` reads it as is. The base fingerprint lives in
``adapter_config.json`` (``base_fingerprint``); see ``docs/delta-format.md``.

0.1.0 files (per-layer vectors stacked under ``...layer.*....bitfit_delta.delta`` with a ``....layer_index``
tensor, flat vectors under ``....bitfit_delta.delta``) are converted by :func:`from_legacy` when they are loaded.

:func:`check_adapter_state_dict` is the strict gate every load passes before any weight changes: only deltas of the
targeted modules and the config's ``modules_to_save`` tensors get in.

Example:
    >>> import torch
    >>> old = {"base_model.model.l.*.fc.bitfit_delta.delta": torch.ones(2, 3),
    ...        "base_model.model.l.*.fc.bitfit_delta.layer_index": torch.tensor([0, 1], dtype=torch.int32)}
    >>> sorted(from_legacy(old))
    ['base_model.model.l.0.fc.bitfit_delta', 'base_model.model.l.1.fc.bitfit_delta']
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from bitfit_peft.errors import BitFitError
from bitfit_peft.files.validate import AdapterFileError, check_keys

LEGACY_DELTA_SUFFIX = ".bitfit_delta.delta"
LEGACY_INDEX_SUFFIX = ".bitfit_delta.layer_index"
MAX_LISTED = 3  # keys named in one error message


def is_legacy(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` was written in the 0.1.0 layout."""
    return any(k.endswith((LEGACY_DELTA_SUFFIX, LEGACY_INDEX_SUFFIX)) for k in state_dict)


def from_legacy(
    state_dict: Mapping[str, torch.Tensor], where: str = "the adapter file", mapped: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """0.1.0 layout -> PEFT layout (a checked copy for files in PEFT's layout); a clear error on broken stacks.

    The keys (but ``mapped`` ones: head keys PEFT already mapped to the model) pass
    :func:`~bitfit_peft.files.validate.check_keys` first; a stacked row that lands on a delta the file also holds
    (or another row's), a non-integer or negative layer index, is refused as ambiguous."""
    check_keys([k for k in state_dict if k not in mapped], where)
    if not is_legacy(state_dict):
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    expanded: list[tuple[str, torch.Tensor]] = []
    for key, value in state_dict.items():
        if key.endswith(LEGACY_INDEX_SUFFIX):
            continue
        if not key.endswith(LEGACY_DELTA_SUFFIX):
            out[key] = value
            continue
        plain = key.removesuffix(".delta")
        if ".*." not in key:
            out[plain] = value
            continue
        index_key = key.removesuffix(LEGACY_DELTA_SUFFIX) + LEGACY_INDEX_SUFFIX
        index = state_dict.get(index_key)
        if index is None or index.dim() != 1 or value.dim() < 1 or index.shape[0] != value.shape[0]:
            raise AdapterFileError(
                f"{where}: stacked tensor {key!r} has no matching {index_key!r} of length "
                f"{value.shape[0] if value.dim() else 0}; refusing to load it. Re-save the adapter."
            )
        if index.is_floating_point() or index.is_complex() or index.dtype is torch.bool or (
                index.numel() and int(index.min()) < 0):
            raise AdapterFileError(f"{where}: layer index {index_key!r} is not a list of non-negative integers "
                                   f"({index.dtype}); refusing to load it. Re-save the adapter.")
        expanded.extend((plain.replace(".*.", f".{idx}.", 1), value[row]) for row, idx in enumerate(index.tolist()))
    for key, value in expanded:
        if key in out:
            raise AdapterFileError(f"{where}: two entries for the delta {key!r} (a 0.1.0 stacked row and another "
                                   "entry); refusing the ambiguous file. Keep one of them and re-save the adapter.")
        out[key] = value
    return out


def check_adapter_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str,
    deltas: Mapping[str, tuple[int, ...]],
    heads: Mapping[str, torch.Tensor],
) -> None:
    """Refuse (before anything changes) a state dict that holds anything but the expected deltas and heads.

    ``state_dict`` is keyed like the model (adapter name inserted). Every key must be a delta of a targeted module
    (``deltas``: expected shapes) or a ``modules_to_save`` tensor (``heads``: the model's tensors); every expected
    delta must be present, floating point, finite and of the right shape.
    """
    problems = []
    unexpected = sorted(k for k in state_dict if k not in deltas and k not in heads)
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) that are neither a delta of a targeted module nor a modules_to_save tensor "
            f"of the config (e.g. {unexpected[:MAX_LISTED]})"
        )
    missing = sorted(set(deltas) - set(state_dict))
    if missing:
        problems.append(f"{len(missing)} delta(s) missing from the file (e.g. {missing[:MAX_LISTED]})")
    missing_heads = sorted(set(heads) - set(state_dict))
    if missing_heads:
        problems.append(f"{len(missing_heads)} modules_to_save tensor(s) missing (e.g. {missing_heads[:MAX_LISTED]})")
    wrong, bad_dtype, non_finite = [], [], []
    for key, value in state_dict.items():
        want = deltas.get(key, heads[key].shape if key in heads else None)
        if want is None:
            continue
        if tuple(value.shape) != tuple(want):
            wrong.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
        elif key in deltas and not value.is_floating_point():
            bad_dtype.append(f"{key} ({value.dtype})")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            non_finite.append(key)
    if wrong:
        problems.append(f"shape mismatch: {wrong[:MAX_LISTED]}")
    if bad_dtype:
        problems.append(f"non-float deltas: {bad_dtype[:MAX_LISTED]}")
    if non_finite:
        problems.append(f"NaN/Inf values in {non_finite[:MAX_LISTED]}")
    if problems:
        raise BitFitError(
            f"BitFit adapter {adapter_name!r} does not fit this model: {'; '.join(problems)}. The model is unchanged. "
            "Load the adapter onto the base model (and config) it was trained with, or re-save it."
        )


def fill_pruned(
    state_dict: Mapping[str, torch.Tensor], deltas: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Deltas pruned at save time (``prune_tolerance``) load as zeros."""
    out = dict(state_dict)
    for key, shape in deltas.items():
        out.setdefault(key, torch.zeros(shape))
    return out
