"""Which adapters are in memory: an optional cap with least-recently-used eviction and loading on first request.

Without a cap (``max_resident=None``, the default) every loaded adapter stays resident; a BitFit adapter is
~100-400 KB, so ten thousand fit next to one base. With ``max_resident=K`` the engine keeps at most ``K`` adapters
in memory: every adapter it has loaded stays *known* (its source is remembered), the least recently used one is
evicted when a load needs room, and a request for a known but evicted adapter, or for ``<root>/<name>`` of one of
``adapter_roots``, loads it first (outside the engine lock; the request waits for that load only).

Example:
    >>> # engine = MultiTaskEngine(base, max_resident=1000, adapter_roots=["/srv/adapters"])
    >>> # engine.predict([("task_0042", "text")])  # /srv/adapters/task_0042 loaded on first use
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME

from bitfit_peft.serving.errors import EngineError
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME

__all__ = ["Residency"]

_RETRIES = 3  #: loads of a batch's adapters that a concurrent eviction may undo before the batch gives up


class Residency:
    """Cap, LRU order and on-demand loads of :class:`MultiTaskEngine` (see the module docstring)."""

    # provided by MultiTaskEngine / the other rooms
    _lock: threading.RLock
    _tasks: dict
    max_resident: int | None
    adapter_roots: list[Path]
    _known: dict[str, dict[str, Any]]  #: name -> add_adapter arguments, for loads after an eviction
    _last_used: OrderedDict[str, None]

    # _add(name, source, keep, **kwargs) and _unload(name): the lifecycle room

    def has_task(self, name: str) -> bool:
        """Whether ``name`` can be served: the base, a resident adapter, or (with a cap) one that loads on use."""
        if name == BASE_ADAPTER_NAME or name in self._tasks:
            return True
        return self.max_resident is not None and (name in self._known or self._in_roots(name) is not None)

    def _in_roots(self, name: str) -> Path | None:
        for root in self.adapter_roots:
            folder = root / name
            try:
                if (folder / CONFIG_NAME).is_file():
                    return folder
            except (OSError, ValueError):
                return None
        return None

    def _remember(self, name: str, source: str | Path, kwargs: dict[str, Any]) -> None:
        """Called by a successful load: the adapter is known (reloadable) and the most recently used."""
        self._known[name] = {"source": source, **kwargs}
        self._last_used[name] = None
        self._last_used.move_to_end(name)

    def _forget(self, name: str) -> None:
        """Called by an explicit remove: the adapter is no longer known."""
        self._known.pop(name, None)
        self._last_used.pop(name, None)

    def _make_room(self, keep: Sequence[str] = ()) -> None:
        """Under the lock, after a load committed: evict least recently used adapters down to ``max_resident``."""
        if self.max_resident is None:
            return
        for name in list(self._last_used):
            if len(self._tasks) <= self.max_resident:
                return
            if name in self._tasks and name not in keep:
                self._unload(name)
                self._last_used.pop(name, None)

    def _ensure_resident(self, names: Sequence[str]) -> None:
        """Load the known-but-evicted (or in-roots) adapters among ``names`` before a batch takes the lock."""
        if self.max_resident is None:
            return
        wanted = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
        if len(wanted) > self.max_resident:
            raise EngineError(f"This batch names {len(wanted)} adapters but at most max_resident="
                              f"{self.max_resident} can be in memory at once; send smaller batches.")
        for _ in range(_RETRIES):
            missing = [n for n in wanted if n not in self._tasks]
            if not missing:
                return
            for name in missing:
                self._load_known(name, keep=wanted)

    def _load_known(self, name: str, keep: Sequence[str]) -> None:
        args = self._known.get(name)
        if args is None:
            folder = self._in_roots(name)
            if folder is None:
                return  # unknown: the batch's task check reports it
            args = {"source": folder, "hub": False, "within": self.adapter_roots}
        args = dict(args)
        try:
            self._add(name, args.pop("source"), keep, **args)
        except EngineError as err:
            if "already loaded" not in str(err):  # another request loaded it meanwhile: fine
                raise

    def _touch(self, names: Sequence[str]) -> None:
        """Under the lock, when a batch runs: its adapters become the most recently used."""
        if self.max_resident is None:
            return
        for name in names:
            if name in self._last_used:
                self._last_used.move_to_end(name)
