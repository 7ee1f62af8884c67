"""The unlocked half of a hot load: find the adapter's folder, read and check everything in it.

**Prepare** runs without the engine lock, so serving goes on however slow or hostile the folder is: find the
folder (and check every file stays inside it, and inside the allowed roots), parse the config and metadata, check
the base fingerprint and read and check every tensor. What it learns about the served model lives here too: the
*layouts* (where the tensors of an adapter config go, learnt from the first adapter of each that PEFT loaded), the
base-fingerprint answers and the config objects shared by equal configs. The registry then commits under its lock.

A layout is an adapter config apart from its base fingerprint (``layouts.py``): a prepared adapter of a known
layout carries its tensors ready to attach (:attr:`Prepared.deltas`, :attr:`Prepared.heads`); one of a new layout
goes through PEFT's own load under the lock, and the head shapes that load needs are read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from bitfit_peft.files.validate import read_config
from bitfit_peft.names import is_bitfit
from bitfit_peft.serving import adapter_files as files
from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.head_check import check_head
from bitfit_peft.serving.layouts import Layout, read_for_layout
from bitfit_peft.serving.limits import Limits
from bitfit_peft.serving.loaded import LoadRequest
from bitfit_peft.tuner.base_check import base_matches, other_base_error
from bitfit_peft.tuner.config import allow_base_mismatch
from bitfit_peft.tuner.layer import BitFitLayer
from bitfit_peft.tuner.model import BitFitModel

__all__ = ["Prepared", "Preparer"]

#: config fields that do not change where an adapter's tensors go (the rest must be equal to share a layout)
_LAYOUT_FREE = ("base_fingerprint", "base_model_name_or_path", "revision", "inference_mode", "num_labels", "id2label")


@dataclass
class Prepared:
    """An adapter read and checked, ready to commit."""

    source: str
    adapter_dir: Path
    config: Any  #: the parsed PeftConfig (inference mode)
    key: str  #: its layout key
    meta: dict[str, Any]
    head_shapes: dict[str, tuple[int, ...]]
    layout: Layout | None = None  #: set when the tensors below were read for a known layout
    deltas: dict[BitFitLayer, nn.Parameter] | None = None
    heads: dict[ModulesToSaveWrapper, nn.Module] | None = None


def _config_keys(config: Any) -> tuple[str, str]:
    """``(layout key, content key)`` of a config: equal layout keys share a :class:`Layout`, equal content keys one
    config object."""
    data = {**config.to_dict(), "_skip": getattr(config, "_skip_fingerprint", False)}
    content = json.dumps(data, sort_keys=True, default=str)
    for name in (*_LAYOUT_FREE, "_skip"):
        data.pop(name, None)
    return json.dumps(data, sort_keys=True, default=str), content


class Preparer:
    """Reads and checks adapters for one frozen base (see the module docstring); safe to call without the lock."""

    def __init__(self, base: nn.Module, task_type: str, limits: Limits | None = None) -> None:
        self.base, self.task_type = base, task_type
        self.limits = limits if limits is not None else Limits()
        self.layouts: dict[str, Layout] = {}  #: layout key -> where its tensors live; only ever added to
        self._base_checks: dict[str, bool] = {}  #: stored fingerprint -> whether this base matches it
        self._configs: dict[str, Any] = {}  #: equal configs share one object

    def learn(self, key: str, layout: Layout) -> None:
        """Remember the layout PEFT's load just showed (under the registry lock); the first one of a key stays."""
        self.layouts.setdefault(key, layout)

    def prepare(self, name: str, request: LoadRequest) -> Prepared:
        """Everything of a load that reads files (see the module docstring)."""
        adapter_dir = self._folder(request)
        config = self._config(adapter_dir, request)
        meta = files.read_task_metadata(adapter_dir)
        if request.label_names is not None:
            meta["labels"] = [str(x) for x in request.label_names]
        layout_key, content_key = _config_keys(config)
        heads = [str(h) for h in (config.modules_to_save or []) if isinstance(h, str)]
        shapes = files.head_shapes(adapter_dir, heads)  # the header only: a head that cannot run is refused here
        check_head(name, shapes, self.base, heads, self.limits)
        labels = meta.get("labels")
        if isinstance(labels, list) and len(labels) > self.limits.max_labels:
            raise EngineError(f"Adapter {name!r} names {len(labels):,} labels, over the server's max_labels limit "
                              f"of {self.limits.max_labels:,}.")
        prepared = Prepared(str(request.source), adapter_dir, config, layout_key, meta, {})
        layout = self.layouts.get(layout_key)
        weights = adapter_dir / SAFETENSORS_WEIGHTS_NAME
        if layout is not None and weights.is_file():
            self._check_base(name, config, layout)
            read = read_for_layout(weights, layout, config)
            if read is not None:  # else (a 0.1.0 file) PEFT's load converts it
                prepared.layout = layout
                prepared.deltas, prepared.heads = read
                # equal configs share one object (PEFT's own load mutates its config: never shared)
                prepared.config = self._configs.setdefault(content_key, config)
                return prepared
        # PEFT's load matches the config's patterns under the lock, so try them here first (a slow or hostile
        # pattern is refused, bounded, before the lock), and read the head shapes it needs
        BitFitModel.resolve_targets(self.base, config)
        prepared.head_shapes = shapes
        return prepared

    @staticmethod
    def _folder(request: LoadRequest) -> Path:
        """The adapter's local folder, every file of it checked to stay inside it (and inside ``within``)."""
        within = request.within if request.hub is not True else None
        adapter_dir = files.fetch(request.source, revision=request.revision, allow_hub=request.allow_hub,
                                  hub=request.hub, within=within)
        files.check_files(adapter_dir, within)
        return adapter_dir

    def _config(self, adapter_dir: Path, request: LoadRequest) -> Any:
        """The adapter's parsed config, in inference mode, after checking it is a BitFit config of our task type."""
        from peft import PeftConfig

        source = request.source
        raw = read_config(adapter_dir / CONFIG_NAME)  # bounded (checked by files.check_files already)
        if not is_bitfit(raw):
            raise EngineError(f"{source}: not a BitFit adapter (adapter_config.json peft_type="
                              f"{str(raw.get('peft_type'))[:40]!r}).")
        if raw.get("task_type") is not None and raw.get("task_type") != self.task_type:
            raise EngineError(f"{source}: adapter task_type {str(raw['task_type'])[:40]!r} does not match this "
                              f"engine's {self.task_type!r}; serve it with an engine of that task type.")
        try:
            config = PeftConfig.from_pretrained(str(adapter_dir))
        except Exception as err:  # noqa: BLE001 - any malformed config: one message, engine unchanged
            raise EngineError(f"{source}: adapter_config.json is not a valid BitFit config ({err}).") from err
        if request.allow_base_mismatch:
            config = allow_base_mismatch(config)
        config.inference_mode = True
        return config

    def _check_base(self, name: str, config: Any, layout: Layout) -> None:
        """The fingerprint check of PEFT's path (``BitFitModel._prepare_adapter_config``), cached per stored value
        (the base is frozen)."""
        key = json.dumps([config.base_fingerprint, getattr(config, "_skip_fingerprint", False)], sort_keys=True,
                         default=str)
        same = self._base_checks.get(key)
        if same is None:
            same = base_matches(config, self.base, sorted(layout.targets))
            self._base_checks[key] = same
        if not same:
            raise other_base_error(name, config.base_fingerprint)
