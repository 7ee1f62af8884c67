"""The engine's adapter registry: names, loads and unloads, residency, and the model they change.

A hot load runs in two phases. **Prepare** (``prepare.py``), without the lock: find, read and check everything.
**Commit**, under the lock: hand the prepared deltas and head copies to the tuner
(``BitFitModel.attach_adapter``); nothing in it depends on how many adapters are resident, so the 10,000th load
costs what the first does. Unloads go through the tuner too (``detach_adapter``, or PEFT's ``delete_adapter``).

Why not PEFT's ``load_adapter`` for every load: it walks every module and every resident tensor
(``model.state_dict()``, ``named_modules()``, ``train()``), so a hot load grew linearly with the resident count
(220 ms at 2,000 adapters). The registry uses PEFT's own load for the first adapter of each *layout* (same config
but for its base fingerprint), learns from it where that layout's tensors live (``layouts.py``), and commits later
adapters of that layout directly. Bases dispatched by Accelerate always go through PEFT (their modules carry hooks
that PEFT re-creates per copy).

Names: every load gets a fresh internal PEFT name (``task__7``), so a re-loaded task never meets stale state and no
name is a suffix PEFT would confuse with a head (``score``, ``classifier``); users only see theirs. The registry is
where an adapter's name and path are checked (:func:`validate_adapter_name`, ``adapter_files.locate``); a server
only maps its errors to HTTP codes. (Not to be confused with ``ray_serve.AdapterRegistry``, the cluster-wide list
of adapter specs that Ray replicas sync to.)

Example:
    >>> validate_adapter_name("sst2-v2")
    'sst2-v2'
    >>> validate_adapter_name("../etc")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    bitfit_peft.serving.errors.AdapterNameError: ...
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from torch import nn

from bitfit_peft.serving import adapter_files as files
from bitfit_peft.serving.errors import (
    AdapterNameError,
    AdapterPathError,
    DuplicateAdapterError,
    EngineError,
    UnknownTaskError,
)
from bitfit_peft.serving.events import AdapterEvents
from bitfit_peft.serving.heads_shape import head_shapes_as, sync_linear_sizes
from bitfit_peft.serving.layouts import Layout, capture_layout
from bitfit_peft.serving.limits import Limits
from bitfit_peft.serving.loaded import AdapterInfo, LoadedAdapter, LoadRequest, describe, tensor_bytes
from bitfit_peft.serving.prepare import Prepared, Preparer
from bitfit_peft.serving.residency import Residency
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME
from bitfit_peft.tuner.unwrap import unwrap_new, wrapper_ids

__all__ = ["Registry", "validate_adapter_name"]

_NAME_MAX = 64
_RETRIES = 3  #: loads of a batch's adapters that a concurrent eviction may undo before the batch gives up
_FAILED_TTL_S = 10.0  #: a load on demand that failed is answered from memory this long (no re-read per batch)


def _is_adapter_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= _NAME_MAX and name.isascii() and name[0].isalpha()
            and all(c.isalnum() or c in "_-" for c in name))


def validate_adapter_name(name: str) -> str:
    """Task (adapter) names: a letter, then up to 63 letters, digits, ``_`` or ``-``."""
    if not _is_adapter_name(name):
        shown = repr(name[:_NAME_MAX + 8]) if isinstance(name, str) else type(name).__name__
        raise AdapterNameError(
            f"Invalid adapter name {shown}: use a letter followed by letters, digits, '_' or '-' (at most 64)."
        )
    return name


class Registry:
    """The adapters of one served model (see the module docstring).

    Args:
        base: the frozen base model (the registry wraps it in a ``PeftModel`` at the first load).
        task_type: the engine's PEFT task type; adapters of another are refused.
        residency: the cap and LRU bookkeeping (default: no cap).
        adapter_roots: with a cap, where adapters load from on first use (``<root>/<name>``): loading on demand,
            each load bounded by ``limits.load_timeout_s``.
        limits: head caps and the on-demand load timeout (``limits.py``).
    """

    def __init__(self, base: nn.Module, task_type: str, *, residency: Residency | None = None,
                 adapter_roots: Sequence[str | Path] = (), limits: Limits | None = None) -> None:
        self.base, self.task_type = base, task_type
        self.lock = threading.RLock()  #: held to change or use the model's adapters
        self.peft_model: Any = None  #: the PeftModel, created by the first load
        self.residency = residency if residency is not None else Residency(None)
        self.roots = tuple(Path(r).expanduser().resolve() for r in adapter_roots)
        self.limits = limits if limits is not None else Limits()
        self._preparer = Preparer(base, task_type, self.limits)
        self._on_demand = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bitfit-load") if self.roots else None
        self._failed: dict[str, tuple[float, EngineError]] = {}  #: on-demand loads that failed lately
        self._loaded: dict[str, LoadedAdapter] = {}  #: by user name, in load order
        self._retired: set[str] = set()  #: removed, but kept until another adapter is loaded (PEFT needs >= 1)
        self._serial = 0
        self.events = AdapterEvents()  #: every load, unload, eviction and refused load (logged; metrics listen)

    @property
    def model(self) -> nn.Module:
        """The served model: the ``PeftModel`` once an adapter is loaded, else the bare base."""
        return self.peft_model if self.peft_model is not None else self.base

    @property
    def layouts(self) -> dict[str, Layout]:
        """The layouts learnt so far (layout key -> where its tensors live)."""
        return self._preparer.layouts

    # ------------------------------------------------------------------ names (lock-free snapshots)
    def names(self) -> list[str]:
        return list(self._loaded)

    def get(self, name: str) -> LoadedAdapter | None:
        return self._loaded.get(name)

    def infos(self) -> list[AdapterInfo]:
        return [a.info() for a in list(self._loaded.values())]

    def is_resident(self, name: str) -> bool:
        """The base, or an adapter in memory now (a batch of it needs no load)."""
        return name == BASE_ADAPTER_NAME or name in self._loaded

    def can_serve(self, name: str) -> bool:
        """The base, a resident adapter, or (with a cap) one that loads on first use."""
        if name == BASE_ADAPTER_NAME or name in self._loaded:
            return True
        return self.residency.capped and self._reload_request(name) is not None

    def require(self, names: Sequence[str]) -> list[str]:
        """``names`` if every one is the base or resident, else :class:`UnknownTaskError` (before any compute)."""
        unknown = sorted({t for t in names if t != BASE_ADAPTER_NAME and t not in self._loaded})
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown[:20]}; loaded adapters: {sorted(self._loaded)[:20]} "
                f"(use {BASE_ADAPTER_NAME!r} for the bare base model)."
            )
        return list(names)

    def peft_names(self, names: Sequence[str]) -> list[str]:
        """The PEFT adapter name of each of ``names`` (under the lock, after :meth:`require`)."""
        return [BASE_ADAPTER_NAME if n == BASE_ADAPTER_NAME else self._loaded[n].internal for n in names]

    # ------------------------------------------------------------------ load
    def add(self, name: str, source: str | Path, *, revision: str | None = None,
            label_names: Sequence[str] | None = None, allow_hub: bool = True, allow_base_mismatch: bool = False,
            hub: bool | None = None, within: Sequence[str | Path] | None = None, pin: bool = False) -> AdapterInfo:
        """Load the adapter at ``source`` as ``name`` (see :meth:`MultiTaskEngine.add_adapter`)."""
        roots = None if within is None else tuple(Path(r).expanduser().resolve() for r in within)
        labels = None if label_names is None else tuple(str(x) for x in label_names)
        request = LoadRequest(source, revision, labels, allow_hub, allow_base_mismatch, hub, roots)
        return self._add(name, request, keep=(), pin=pin)

    def _add(self, name: str, request: LoadRequest, keep: Sequence[str], timeout: float | None = None,
             pin: bool = False) -> AdapterInfo:
        """:meth:`add`, reported to :attr:`events` (a load, or a refused load with the error as reason)."""
        started, reason = time.perf_counter(), "first use" if keep else "requested"
        try:
            info = self._add_now(name, request, keep, timeout, pin)
        except Exception as err:
            self.events.emit("load_failed", str(name)[:_NAME_MAX], reason=f"{type(err).__name__}: {err}",
                             seconds=time.perf_counter() - started)
            raise
        self.events.emit("load", name, reason=reason, seconds=time.perf_counter() - started)
        return info

    def _add_now(self, name: str, request: LoadRequest, keep: Sequence[str], timeout: float | None,
                 pin: bool) -> AdapterInfo:
        """:meth:`add`; ``keep``: adapters an eviction this load causes must not touch (a batch's); ``timeout``: the
        reading may take at most this long (loads on demand)."""
        validate_adapter_name(name)
        self._refuse_duplicate(name)  # before reading any file
        prepared = self._prepare(name, request, timeout)
        with self.lock:
            self._refuse_duplicate(name)  # again: another load of this name may have committed while we prepared
            self._serial += 1
            loaded = self._commit(name, f"{name}__{self._serial}", prepared)
            self._loaded[name] = loaded
            if pin:
                self.residency.pin(name)
            self.residency.remember(name, request)
            for victim in self.residency.take_victims(self._loaded, keep=[*keep, name]):
                self._unload(victim)
                self.events.emit("evict", victim, reason=f"least recently used; max_resident="
                                                         f"{self.residency.capacity} reached loading {name!r}")
            for old in sorted(self._retired):
                self._detach(old, None)
            self._retired.clear()
            return loaded.info()

    def _prepare(self, name: str, request: LoadRequest, timeout: float | None) -> Prepared:
        if timeout is None or self._on_demand is None:
            return self._preparer.prepare(name, request)
        future = self._on_demand.submit(self._preparer.prepare, name, request)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:  # the reading goes on in its thread; its result is dropped, nothing is committed
            raise EngineError(f"Loading adapter {name!r} on demand took longer than {timeout:g} s "
                              "(load_timeout_s); ask the operator to load it.") from None

    def _refuse_duplicate(self, name: str) -> None:
        if name in self._loaded:
            raise DuplicateAdapterError(f"An adapter named {name!r} is already loaded; remove it first or pick a new "
                                        "name.")

    def _commit(self, name: str, internal: str, prepared: Prepared) -> LoadedAdapter:
        """Put ``prepared`` into the model as ``internal`` (under the lock); on any error the model is unchanged."""
        try:
            if prepared.layout is not None:  # read for a known layout (layouts are never replaced)
                layout = prepared.layout
                assert prepared.deltas is not None and prepared.heads is not None
                self.peft_model.base_model.attach_adapter(internal, prepared.config, prepared.deltas,
                                                          prepared.heads, layout.targets)
            else:
                layout = self._load_with_peft(internal, prepared)
        except Exception as err:
            _rename_in_message(err, internal, name)
            raise
        try:
            heads = [w.modules_to_save[internal] for w in layout.wrappers]
            kind, labels, outputs = describe(name, self.task_type, heads, int(self.base.config.num_labels),
                                             prepared.meta)
            deltas = [layer.delta_of(internal) for layer in layout.deltas.values()]
            sizes = (*tensor_bytes(deltas), tensor_bytes([p for h in heads for p in h.parameters()])[1])
        except Exception as err:
            self._detach(internal, layout)
            _rename_in_message(err, internal, name)
            raise
        return LoadedAdapter(name, internal, prepared.source, prepared.config.task_type, kind, labels, layout,
                             outputs, sizes)

    def _load_with_peft(self, internal: str, prepared: Prepared) -> Layout:
        """PEFT's own load (first adapter of a layout); the model is left as before if it fails."""
        from peft import PeftModel

        root = self.base
        before = wrapper_ids(root)
        try:
            with head_shapes_as(root, prepared.head_shapes):
                if self.peft_model is None:
                    self.peft_model = PeftModel.from_pretrained(root, str(prepared.adapter_dir),
                                                                adapter_name=internal, config=prepared.config)
                else:
                    self.peft_model.add_adapter(internal, prepared.config)
                    self.peft_model.load_adapter(str(prepared.adapter_dir), adapter_name=internal)
        except Exception:
            if self.peft_model is not None and internal in self.peft_model.peft_config:
                if len(self.peft_model.peft_config) > 1:
                    self.peft_model.delete_adapter(internal)
                else:  # PEFT keeps >= 1 adapter: drop the PeftModel, back to the bare base
                    self.peft_model = None
            unwrap_new(root, before)
            raise
        self.peft_model.eval()
        layout = capture_layout(self.peft_model, internal)
        for wrapper in layout.wrappers:
            sync_linear_sizes(wrapper.modules_to_save[internal])
        if not getattr(root, "hf_device_map", None):  # dispatched bases always load through PEFT (hooked heads)
            self._preparer.learn(prepared.key, layout)
        return layout

    # ------------------------------------------------------------------ unload
    def remove(self, name: str) -> None:
        """Unload ``name`` and forget it (in-flight batches finish first: they hold the lock)."""
        with self.lock:
            if name not in self._loaded:
                raise UnknownTaskError(f"No adapter named {name!r} is loaded; loaded: {sorted(self._loaded)[:20]}.")
            self._unload(name)
            self.residency.forget(name)
        self.events.emit("unload", name, reason="requested")

    def _unload(self, name: str) -> None:
        """Take ``name`` out of memory (under the lock); an eviction keeps it known."""
        loaded = self._loaded.pop(name)
        self._detach(loaded.internal, loaded.layout)

    def _detach(self, internal: str, layout: Layout | None) -> None:
        """Take one PEFT adapter out of the model: O(layers); PEFT's active adapter moves to another first."""
        model = self.peft_model
        if model is None or internal not in model.peft_config:
            return
        others = [a.internal for a in reversed(self._loaded.values()) if a.internal != internal]
        if not others:  # PEFT needs >= 1 adapter: keep it until the next load
            self._retired.add(internal)
            return
        if internal in model.active_adapters:
            model.set_adapter(others[0])  # the most recently loaded: the last an LRU would evict
        if layout is None:
            model.delete_adapter(internal)
            return
        model.base_model.detach_adapter(internal)

    # ------------------------------------------------------------------ residency
    def touch(self, names: Sequence[str]) -> None:
        """Under the lock, when a batch runs: its adapters become the most recently used."""
        self.residency.touch(names)

    def ensure_resident(self, names: Sequence[str]) -> None:
        """With a cap: load the known-but-evicted (or in-roots) adapters among ``names``, before a batch takes the
        lock (the batch waits for these loads only)."""
        if not self.residency.capped:
            return
        wanted = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
        capacity = self.residency.capacity
        counted = [n for n in wanted if n not in self.residency.pinned]
        if capacity is not None and len(counted) > capacity:  # the server splits its batches into rounds first
            raise EngineError(
                f"This batch names {len(counted)} adapters but at most max_resident={capacity} can be in memory at "
                "once; send smaller batches.")
        for _ in range(_RETRIES):
            missing = [n for n in wanted if n not in self._loaded]
            if not missing:
                return
            for name in missing:
                self._load_on_use(name, wanted)

    def _load_on_use(self, name: str, keep: Sequence[str]) -> None:
        """Load the known-but-evicted (or in-roots) ``name``; a recent failure is raised again without re-reading."""
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() - failed[0] < _FAILED_TTL_S:
            raise failed[1]
        request = self._reload_request(name)
        if request is None:
            return  # unknown: the batch's require() reports it
        known = self.residency.request_for(name) is not None
        try:
            self._add(name, request, keep=keep, timeout=None if known else self.limits.load_timeout_s)
        except DuplicateAdapterError:  # another request loaded it meanwhile: fine
            pass
        except Exception as err:  # noqa: BLE001 - one refusal (a 4xx) for this adapter's requests only
            refusal = err if isinstance(err, EngineError) else EngineError(
                f"Adapter {name!r} could not be loaded on demand ({type(err).__name__}).")
            self._failed[name] = (time.monotonic(), refusal)
            raise refusal from err
        self._failed.pop(name, None)

    def _reload_request(self, name: str) -> LoadRequest | None:
        """How to load ``name`` on first use: as it was loaded last, else ``<root>/<name>`` of an adapter root."""
        known = self.residency.request_for(name)
        if known is not None or not self.roots or not _is_adapter_name(name):
            return known
        try:
            folder = files.locate(name, self.roots)
        except AdapterPathError:  # nothing loadable there (or it leads outside the roots)
            return None
        return LoadRequest(folder, hub=False, within=self.roots)


def _rename_in_message(err: BaseException, internal: str, name: str) -> None:
    """Put the user's adapter ``name`` where a message names the internal PEFT name (``name__3``), in place."""
    if len(err.args) == 1 and isinstance(err.args[0], str) and internal in err.args[0]:
        err.args = (err.args[0].replace(repr(internal), repr(name)).replace(internal, name),)
