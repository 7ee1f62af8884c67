"""The BitFit delta file: ``adapter_model.safetensors`` holding only bias deltas (+ ``modules_to_save``).

Layout (format version 1, see ``docs/delta-format.md``):

- Per-layer delta vectors that differ only in their block index are stacked into one tensor under a key with
  ``*`` in place of the index, e.g. ``base_model.model.bert.encoder.layer.*.attention.self.query.bitfit_delta.delta``
  (shape ``[n_layers, 768]``) plus ``....bitfit_delta.layer_index`` (int32 ``[n_layers]``). This keeps the
  safetensors header tiny (a few dozen keys instead of hundreds), so the file is ~raw bytes of the vectors.
- Vectors outside numbered blocks keep their plain key ``<module path>.bitfit_delta.delta``.
- Metadata: ``format="pt"``, ``bitfit_format_version``, ``bitfit_fingerprint`` (see :func:`fingerprint_layers`),
  ``bitfit_peft_version``.

Files written by plain PEFT (unstacked keys, no metadata) load too: :func:`unpack` is a no-op on them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

FORMAT_VERSION = "1"
DELTA_SUFFIX = ".bitfit_delta.delta"
INDEX_SUFFIX = ".bitfit_delta.layer_index"
_PEFT_PREFIXES = ("base_model.model.", "_orig_mod.")
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<suffix>.*\.bitfit_delta\.delta)$")
_staged = threading.local()


# ---------------------------------------------------------------------------- fingerprint
def _relative(name: str) -> str:
    for prefix in _PEFT_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def _materialize(module: nn.Module, tensor: torch.Tensor | None, attr: str = "bias") -> torch.Tensor | None:
    """Real values of a parameter, also when Accelerate offloaded it (meta tensor + weights_map)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
        return tensor if isinstance(tensor, torch.Tensor) else None
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is not None and attr in weights_map:
        return weights_map[attr]
    raise OffloadedValuesUnavailable(
        f"the {attr} of a {type(module).__name__} is offloaded (meta) with no weights map to read it from"
    )


class OffloadedValuesUnavailable(RuntimeError):
    """An offloaded parameter's values cannot be read (PEFT removed Accelerate's hooks before injection)."""


WEIGHT_SAMPLE = 16


def fingerprint(
    entries: Iterable[tuple[str, tuple[int, ...], torch.Tensor | None, torch.Tensor | None]],
) -> str:
    """``sha256`` over the targeted modules' names, bias shapes, original bias values and a weight sample.

    Each entry is ``(name, bias shape, original bias or None, first WEIGHT_SAMPLE weight values or None)``.
    Values are rounded to bf16, so the fingerprint is the same for a base loaded in fp32, fp16 or bf16; the
    weight sample tells apart bases whose biases are identical (e.g. all zero after random init).
    """
    digest = hashlib.sha256()
    for name, shape, bias, weight_sample in sorted(entries, key=lambda e: e[0]):
        digest.update(f"{name}|{tuple(shape)}|".encode())
        for tensor in (bias, weight_sample):
            if tensor is None:
                digest.update(b"none|")
            else:
                values = tensor.detach().reshape(-1).to("cpu", torch.bfloat16).contiguous().view(torch.int16)
                digest.update(values.numpy().tobytes() + b"|")
        digest.update(b";")
    return "sha256:" + digest.hexdigest()


def _weight_sample(module: nn.Module) -> torch.Tensor | None:
    weight = _materialize(module, getattr(module, "weight", None), "weight")
    return None if weight is None else weight.detach().reshape(-1)[:WEIGHT_SAMPLE]


def fingerprint_layers(layers: Mapping[str, Any]) -> str:
    """Fingerprint of BitFit layers ``{module name: BitFitLayer}`` (uses the pre-merge biases)."""
    entries = []
    for name, layer in layers.items():
        base = layer.get_base_layer()
        bias = _materialize(base, layer.original_bias())
        entries.append((_relative(name), layer._bias_shape, bias, _weight_sample(base)))
    return fingerprint(entries)


def fingerprint_model(model: nn.Module, names: Iterable[str]) -> str:
    """Fingerprint of the modules ``names`` of an (unwrapped or partly wrapped) model."""
    from .layer import BitFitLayer, bias_shape

    entries = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, BitFitLayer):
            base = module.get_base_layer()
            bias = _materialize(base, module.original_bias())
            entries.append((_relative(name), module._bias_shape, bias, _weight_sample(base)))
        else:
            bias = _materialize(module, getattr(module, "bias", None))
            entries.append((_relative(name), bias_shape(module), bias, _weight_sample(module)))
    return fingerprint(entries)


# ---------------------------------------------------------------------------- stacking
def pack(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack per-block delta vectors (same module path except the block index, same shape and dtype)."""
    groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _BLOCK.match(key) if key.endswith(DELTA_SUFFIX) else None
        if match is None:
            out[key] = value
            continue
        group = (match["prefix"], match["suffix"], tuple(value.shape), value.dtype)
        groups[group].append((int(match["idx"]), key))
    for (prefix, suffix, _, _), members in groups.items():
        if len(members) == 1:
            out[members[0][1]] = state_dict[members[0][1]]
            continue
        members.sort()
        stacked_key = f"{prefix}.*.{suffix}"
        out[stacked_key] = torch.stack([state_dict[k] for _, k in members]).contiguous()
        out[stacked_key.removesuffix(DELTA_SUFFIX) + INDEX_SUFFIX] = torch.tensor(
            [i for i, _ in members], dtype=torch.int32
        )
    return out


def unpack(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`; raises a clear error on inconsistent stacked entries."""
    from .model import BitFitError

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        if ".*." not in key:
            out[key] = value
            continue
        index_key = key.removesuffix(DELTA_SUFFIX) + INDEX_SUFFIX
        index = state_dict.get(index_key)
        if index is None or index.dim() != 1 or value.dim() < 1 or index.shape[0] != value.shape[0]:
            raise BitFitError(
                f"Corrupt BitFit delta file: stacked tensor {key!r} has no matching {index_key!r} of length "
                f"{value.shape[0] if value.dim() else 0}. Re-save the adapter."
            )
        for row, idx in enumerate(index.tolist()):
            out[key.replace(".*.", f".{int(idx)}.", 1)] = value[row]
    return out


# ---------------------------------------------------------------------------- checks
def check_complete(
    model: nn.Module,
    adapter_name: str,
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Every delta the model expects for ``adapter_name`` is present with the right shape, and nothing else."""
    from .model import BitFitError

    expected = expected_delta_shapes(model, adapter_name) if expected is None else expected
    given = {k: v for k, v in state_dict.items() if ".bitfit_delta." in k}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {expected[k]}"
        for k, v in given.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    bad_dtype = [k for k, v in given.items() if not v.is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} delta(s) missing from the file (e.g. {missing[:3]})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} delta(s) in the file match no module of this model (e.g. {unexpected[:3]})"
        )
    if wrong:
        problems.append(f"shape mismatch: {wrong[:3]}")
    if bad_dtype:
        problems.append(f"non-float deltas: {bad_dtype[:3]}")
    if problems:
        raise BitFitError(
            f"BitFit adapter {adapter_name!r} does not fit this model: "
            + "; ".join(problems)
            + ". The model is "
            "unchanged. Load the adapter onto the base model (and config) it was trained with."
        )


def expected_delta_shapes(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """``{state-dict key: shape}`` of every delta the model holds for ``adapter_name``."""
    from .layer import BitFitLayer

    return {
        f"{name}.bitfit_delta.{adapter_name}": module._bias_shape
        for name, module in model.named_modules()
        if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta
    }


def fill_pruned(
    model: nn.Module,
    adapter_name: str,
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Deltas pruned at save time (``prune_tolerance``) load as zeros."""
    out = dict(state_dict)
    expected = expected_delta_shapes(model, adapter_name) if expected is None else expected
    for key, shape in expected.items():
        out.setdefault(key, torch.zeros(shape))
    return out


# ---------------------------------------------------------------------------- writing
def stage_metadata(fingerprint_value: str) -> None:
    """Remember the fingerprint for the next BitFit file written by this thread."""
    _staged.fingerprint = fingerprint_value


def metadata_for_save() -> dict[str, str]:
    from . import __version__

    meta = {"format": "pt", "bitfit_format_version": FORMAT_VERSION, "bitfit_peft_version": __version__}
    fp = getattr(_staged, "fingerprint", None)
    if fp:
        meta["bitfit_fingerprint"] = fp
    return meta


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """``safetensors`` save to a temporary file in the same directory, fsync, then ``os.replace``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_delta_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write a (BitFit or other) PEFT state dict; BitFit ones are stacked and stamped with metadata."""
    if any(DELTA_SUFFIX in k for k in tensors):
        tensors = pack(tensors)
        metadata = {**(metadata or {}), **metadata_for_save()}
    atomic_save_file(tensors, path, metadata=metadata)
