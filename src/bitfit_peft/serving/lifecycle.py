"""The adapter room of :class:`~bitfit_peft.serving.engine.MultiTaskEngine`: fetch, validate, load, evict, names.

A hot load runs in two phases. **Prepare**, without the engine lock (serving goes on, however slow or hostile the
folder): find the folder, check every file stays inside it (and inside the server's roots), parse the config and
metadata, check the base fingerprint and read and check every tensor. **Commit**, under the lock: put the deltas
into the BitFit layers and the head copies into the head wrappers; nothing in it depends on how many adapters are
resident, so the 10,000th load costs what the first does.

Why the commit writes PEFT's structures (``peft_config``, each layer's ``bitfit_delta``, each head wrapper's
``modules_to_save``) itself: PEFT's ``load_adapter`` walks every module and every resident tensor
(``model.state_dict()``, ``named_modules()``, ``train()``), so a hot load grew linearly with the resident count
(220 ms at 2,000 adapters). The engine uses PEFT's own load for the first adapter of each *layout* (same config
but for its base fingerprint), learns from it where that layout's tensors live (:class:`Layout`), and commits
later adapters of that layout directly. Bases dispatched by Accelerate always go through PEFT (their modules
carry hooks that PEFT re-creates per copy).

Names: the engine gives every load a fresh internal PEFT name (``task__7``), so a re-loaded task never meets stale
state and no name is a suffix PEFT would confuse with a head (``score``, ``classifier``); users only see theirs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from bitfit_peft.names import is_bitfit
from bitfit_peft.serving import adapter_files as files
from bitfit_peft.serving.errors import DuplicateAdapterError, EngineError, UnknownTaskError
from bitfit_peft.serving.heads_shape import head_shapes_as, sync_linear_sizes
from bitfit_peft.serving.layouts import Layout, capture_layout, read_for_layout
from bitfit_peft.tuner.base_check import base_matches, other_base_error
from bitfit_peft.tuner.config import allow_base_mismatch as _allow_mismatch
from bitfit_peft.tuner.heads import route_heads, routing_of
from bitfit_peft.tuner.layer import BitFitLayer
from bitfit_peft.tuner.model import BitFitModel, unwrap_new, wrapper_ids

__all__ = ["AdapterInfo", "AdapterLifecycle", "Layout", "validate_adapter_name"]

_NAME_MAX = 64
#: config fields that do not change where an adapter's tensors go (the rest must be equal to share a layout)
_LAYOUT_FREE = ("base_fingerprint", "base_model_name_or_path", "revision", "inference_mode")


def validate_adapter_name(name: str) -> str:
    """Task (adapter) names: a letter, then up to 63 letters, digits, ``_`` or ``-``."""
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= _NAME_MAX
        or not name.isascii()
        or not name[0].isalpha()
        or not all(c.isalnum() or c in "_-" for c in name)
    ):
        shown = repr(name[:_NAME_MAX + 8]) if isinstance(name, str) else type(name).__name__
        raise EngineError(
            f"Invalid adapter name {shown}: use a letter followed by letters, digits, '_' or '-' (at most 64)."
        )
    return name


@dataclass
class AdapterInfo:
    """What :meth:`MultiTaskEngine.adapters` reports for one loaded adapter."""

    name: str
    source: str
    task_type: str | None
    kind: str
    labels: list[str] | None
    num_labels: int | None
    delta_params: int
    delta_bytes: int
    head_bytes: int

    @property
    def total_bytes(self) -> int:
        """Memory this adapter adds on top of the shared base (bias deltas + its own head copy)."""
        return self.delta_bytes + self.head_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass
class Task:
    """A loaded adapter, as the engine knows it."""

    name: str
    internal: str  #: the PEFT adapter name (see the module docstring)
    source: str
    task_type: str | None
    kind: str
    labels: list[str] | None
    layout: Layout
    outputs: int | None = None  #: head outputs (SEQ_CLS)
    sizes: tuple[int, int, int] = (0, 0, 0)  #: delta params, delta bytes, head bytes


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


def _nbytes(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


class AdapterLifecycle:
    """Adapter management of :class:`MultiTaskEngine` (see the module docstring)."""

    # provided by MultiTaskEngine.__init__
    task_type: str
    _base: nn.Module
    _model: Any
    _lock: threading.RLock
    _tasks: dict[str, Task]
    _retired: set[str]
    _serial: int
    _layouts: dict[str, Layout]
    _base_checks: dict[str, bool]
    _configs: dict[str, Any]

    # _describe(task, meta) -> Task: provided by the inference room (labels, kinds, head outputs)
    # _remember / _forget / _make_room: provided by the residency room (cap and LRU order)

    # ------------------------------------------------------------------ names
    def tasks(self) -> list[str]:
        """Names of the loaded adapters (``"__base__"``, the bare base, is always servable too).

        Lock-free snapshot, so health checks and request validation never wait for a running batch.
        """
        return list(self._tasks)

    def adapters(self) -> list[AdapterInfo]:
        """Name, task type, labels and memory (delta + head bytes) of every loaded adapter."""
        return [self._info(t) for t in list(self._tasks.values())]

    @staticmethod
    def _info(task: Task) -> AdapterInfo:
        n_delta, delta_bytes, head_bytes = task.sizes
        return AdapterInfo(task.name, task.source, task.task_type, task.kind, task.labels,
                           len(task.labels) if task.labels else None, n_delta, delta_bytes, head_bytes)

    # ------------------------------------------------------------------ load
    def add_adapter(
        self,
        name: str,
        source: str | Path,
        *,
        revision: str | None = None,
        label_names: Sequence[str] | None = None,
        allow_hub: bool = True,
        allow_base_mismatch: bool = False,
        hub: bool | None = None,
        within: Sequence[str | Path] | None = None,
    ) -> AdapterInfo:
        """Load the BitFit adapter at ``source`` (a local directory or a Hub id) as task ``name``.

        ``hub=True``: ``source`` is a Hub id (never read from disk); ``hub=False``: a local folder only. ``within``:
        folders every file read must resolve inside (a server's adapter roots). ``allow_base_mismatch=True`` skips
        the base-model fingerprint check. Raises :class:`EngineError` (its subclasses :class:`AdapterPathError`,
        :class:`DuplicateAdapterError`) or ``BitFitError`` (another base); on any error the engine is unchanged.
        Files are read and checked without holding the engine lock.
        """
        return self._add(name, source, (), revision=revision, label_names=label_names, allow_hub=allow_hub,
                         allow_base_mismatch=allow_base_mismatch, hub=hub, within=within)

    def _add(
        self, name: str, source: str | Path, keep: Sequence[str], *, revision: str | None = None,
        label_names: Sequence[str] | None = None, allow_hub: bool = True, allow_base_mismatch: bool = False,
        hub: bool | None = None, within: Sequence[str | Path] | None = None,
    ) -> AdapterInfo:
        """:meth:`add_adapter`; ``keep``: adapters an eviction this load causes must not touch (a batch's)."""
        validate_adapter_name(name)
        if name in self._tasks:
            raise DuplicateAdapterError(f"An adapter named {name!r} is already loaded; remove it first or pick a new "
                                        "name.")
        roots = None if within is None else [Path(r).expanduser().resolve() for r in within]
        prepared = self._prepare(name, source, revision, allow_hub, hub, roots, allow_base_mismatch, label_names)
        with self._lock:
            if name in self._tasks:
                raise DuplicateAdapterError(f"An adapter named {name!r} is already loaded; remove it first or pick a "
                                            "new name.")
            self._serial += 1
            internal = f"{name}__{self._serial}"
            try:
                if prepared.layout is not None:  # read for a known layout (layouts are never replaced)
                    layout = prepared.layout
                    self._commit(internal, prepared)
                else:
                    layout = self._load_with_peft(internal, prepared)
            except Exception as err:
                _rename_in_message(err, internal, name)
                raise
            try:
                task = Task(name, internal, prepared.source, prepared.config.task_type, "", None, layout)
                task = self._describe(task, prepared.meta)
                deltas = [layer._deltas[internal] for layer in layout.deltas.values()]
                heads = [p for w in layout.wrappers for p in w.modules_to_save[internal].parameters()]
                task.sizes = (*_nbytes(deltas), _nbytes(heads)[1])
            except Exception as err:
                self._detach(internal, layout)
                _rename_in_message(err, internal, name)
                raise
            self._tasks[name] = task
            self._remember(name, source, {"revision": revision, "label_names": label_names, "allow_hub": allow_hub,
                                          "allow_base_mismatch": allow_base_mismatch, "hub": hub, "within": within})
            self._make_room([*keep, name])
            for old in sorted(self._retired):
                self._detach(old, None)
            self._retired.clear()
            return self._info(task)

    def _prepare(
        self, name: str, source: str | Path, revision: str | None, allow_hub: bool, hub: bool | None,
        roots: list[Path] | None, allow_base_mismatch: bool, label_names: Sequence[str] | None,
    ) -> Prepared:
        """Everything that reads files, before the lock (see the module docstring)."""
        from peft import PeftConfig

        adapter_dir = files.fetch(source, revision=revision, allow_hub=allow_hub, hub=hub,
                                  within=roots if hub is not True else None)
        files.check_files(adapter_dir, roots if hub is not True else None)
        raw = files.read_json(adapter_dir / CONFIG_NAME)
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
        if allow_base_mismatch:
            config = _allow_mismatch(config)
        config.inference_mode = True
        meta = files.read_task_metadata(adapter_dir)
        if label_names is not None:
            meta["labels"] = [str(x) for x in label_names]
        layout_key, content_key = _config_keys(config)
        prepared = Prepared(str(source), adapter_dir, config, layout_key, meta, {})
        layout = self._layouts.get(layout_key)
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
        # PEFT's load: it matches the config's patterns under the lock, so try them here first (a slow or hostile
        # pattern is refused, bounded, before the lock), and read the head shapes it needs

        BitFitModel.resolve_targets(self._base, config)
        heads = [str(h) for h in (config.modules_to_save or []) if isinstance(h, str)]
        prepared.head_shapes = files.head_shapes(adapter_dir, heads)
        return prepared

    def _check_base(self, name: str, config: Any, layout: Layout) -> None:
        """The fingerprint check of PEFT's path (``BitFitModel._prepare_adapter_config``), cached per stored value
        (the base is frozen)."""
        key = json.dumps([config.base_fingerprint, getattr(config, "_skip_fingerprint", False)], sort_keys=True,
                         default=str)
        same = self._base_checks.get(key)
        if same is None:
            same = base_matches(config, self._model.base_model.model, sorted(layout.targets))
            self._base_checks[key] = same
        if not same:
            raise other_base_error(name, config.base_fingerprint)

    def _commit(self, internal: str, prepared: Prepared) -> None:
        """Put a prepared adapter of a known layout into the model: O(layers), whatever is resident."""
        assert prepared.deltas is not None and prepared.heads is not None and prepared.layout is not None
        self._model.base_model.attach_adapter(
            internal, prepared.config, prepared.deltas, prepared.heads, prepared.layout.targets
        )

    def _load_with_peft(self, internal: str, prepared: Prepared) -> Layout:
        """PEFT's own load (first adapter of a layout); the model is left as before if it fails."""
        from peft import PeftModel

        root = self._base
        before = wrapper_ids(root)
        try:
            with head_shapes_as(root, prepared.head_shapes):
                if self._model is None:
                    self._model = PeftModel.from_pretrained(root, str(prepared.adapter_dir), adapter_name=internal,
                                                            config=prepared.config)
                else:
                    self._model.add_adapter(internal, prepared.config)
                    self._model.load_adapter(str(prepared.adapter_dir), adapter_name=internal)
        except Exception:
            if self._model is not None and internal in self._model.peft_config:
                if len(self._model.peft_config) > 1:
                    self._model.delete_adapter(internal)
                else:  # PEFT keeps >= 1 adapter: drop the PeftModel, back to the bare base
                    self._model = None
            unwrap_new(root, before)
            raise
        self._model.eval()
        layout = capture_layout(self._model, internal)
        for wrapper in layout.wrappers:
            sync_linear_sizes(wrapper.modules_to_save[internal])

        route_heads(layout.wrappers, routing_of(self._model))
        if not getattr(root, "hf_device_map", None):  # dispatched bases always load through PEFT (hooked heads)
            self._layouts.setdefault(prepared.key, layout)
        return layout

    # ------------------------------------------------------------------ unload
    def remove_adapter(self, name: str) -> None:
        """Unload task ``name`` (safe while other threads serve; in-flight batches finish first)."""
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"No adapter named {name!r} is loaded; loaded: {sorted(self._tasks)[:20]}.")
            self._unload(name)
            self._forget(name)

    def _unload(self, name: str) -> None:
        """Take task ``name`` out of memory (under the lock); an eviction keeps it known."""
        task = self._tasks.pop(name)
        self._detach(task.internal, task.layout)

    def _detach(self, internal: str, layout: Layout | None) -> None:
        """Take one PEFT adapter out of the model: O(layers); PEFT's active adapter moves to another first."""
        model = self._model
        if model is None or internal not in model.peft_config:
            return
        others = [t.internal for t in reversed(self._tasks.values()) if t.internal != internal]
        if not others:  # PEFT needs >= 1 adapter: keep it until the next load
            self._retired.add(internal)
            return
        if internal in model.active_adapters:
            model.set_adapter(others[0])  # the most recently loaded: the last an LRU would evict
        if layout is None:
            model.delete_adapter(internal)
            return
        model.base_model.detach_adapter(internal)


def _rename_in_message(err: BaseException, internal: str, name: str) -> None:
    """Put the user's adapter ``name`` where a message names the internal PEFT name (``name__3``), in place."""
    if len(err.args) == 1 and isinstance(err.args[0], str) and internal in err.args[0]:
        err.args = (err.args[0].replace(repr(internal), repr(name)).replace(internal, name),)
