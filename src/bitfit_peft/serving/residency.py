"""Which adapters may be in memory: an optional cap, least-recently-used order and how to reload each adapter.

Without a cap (``max_resident=None``, the default) every loaded adapter stays resident; a BitFit adapter is
~100-400 KB, so ten thousand fit next to one base. With ``max_resident=K`` the engine keeps at most ``K`` adapters
in memory: every adapter it has loaded stays *known* (how to load it is remembered), the least recently used one is
evicted when a load needs room, and a request for a known but evicted adapter (or for ``<root>/<name>`` of one of
``adapter_roots``) loads it first.

:class:`Residency` is only the bookkeeping, like vLLM's ``AdapterLRUCache``: it says *which* adapters to evict and
*how* to reload one; the registry (``registry.py``) does the loading and unloading, under its lock.

Example:
    >>> from bitfit_peft.serving.loaded import LoadRequest
    >>> lru = Residency(capacity=2)
    >>> for name in ("a", "b", "c"):
    ...     lru.remember(name, LoadRequest(f"/srv/adapters/{name}"))
    >>> lru.touch(["a"])  # "a" served a batch: "b" is now the least recently used
    >>> lru.take_victims(resident=["a", "b", "c"], keep=["c"])
    ['b']
    >>> lru.request_for("b").source  # evicted, still known
    '/srv/adapters/b'
    >>> rounds(["a", "b", "a", "c", "__base__"], capacity=2, pinned=set())  # a batch over 3 adapters, K=2
    [[0, 1, 2, 4], [3]]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence

from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.loaded import LoadRequest
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME

__all__ = ["Residency", "rounds"]


class Residency:
    """Known adapters (with how to reload each) and the use order of the resident ones, under an optional cap.

    Not thread-safe by itself: the registry calls the mutating methods under its lock.
    """

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1):
            raise EngineError(f"max_resident must be a positive integer or None, got {capacity!r}.")
        self.capacity = capacity
        self._known: dict[str, LoadRequest] = {}
        self._order: OrderedDict[str, None] = OrderedDict()  #: resident adapters, least recently used first
        self.pinned: set[str] = set()  #: never evicted, not counted against the cap (the operator's start-up ones)

    @property
    def capped(self) -> bool:
        return self.capacity is not None

    def remember(self, name: str, request: LoadRequest) -> None:
        """A load committed: ``name`` is known (reloadable) and the most recently used."""
        self._known[name] = request
        if name not in self.pinned:
            self._order[name] = None
            self._order.move_to_end(name)

    def pin(self, name: str) -> None:
        """Keep ``name`` resident for good (it no longer counts against the cap)."""
        self.pinned.add(name)
        self._order.pop(name, None)

    def forget(self, name: str) -> None:
        """An explicit remove: ``name`` is no longer known."""
        self._known.pop(name, None)
        self._order.pop(name, None)
        self.pinned.discard(name)

    def request_for(self, name: str) -> LoadRequest | None:
        """How ``name`` was loaded last (None: never, or removed since)."""
        return self._known.get(name)

    def touch(self, names: Iterable[str]) -> None:
        """A batch ran: its adapters become the most recently used (only with a cap: the order matters then)."""
        if self.capacity is None:
            return
        for name in names:
            if name in self._order:
                self._order.move_to_end(name)

    def take_victims(self, resident: Collection[str], keep: Collection[str]) -> list[str]:
        """Adapters of ``resident`` to evict, least recently used first, so that at most ``capacity`` stay; never
        one of ``keep`` or a pinned one. They leave the use order but stay known."""
        if self.capacity is None:
            return []
        excess = len([n for n in resident if n not in self.pinned]) - self.capacity
        victims = [n for n in self._order if n in resident and n not in keep][:max(excess, 0)]
        for name in victims:
            del self._order[name]
        return victims


def rounds(tasks: Sequence[str], capacity: int | None, pinned: Collection[str]) -> list[list[int]]:
    """Indices of ``tasks`` in rounds naming at most ``capacity`` adapters each (the base and ``pinned`` are free)."""
    if capacity is None:
        return [list(range(len(tasks)))]
    order: list[list[int]] = []
    round_of: dict[str, int] = {}
    counts: list[int] = []
    free: list[int] = []  # the base's and pinned adapters' inputs ride with the first round
    for i, task in enumerate(tasks):
        if task == BASE_ADAPTER_NAME or task in pinned:
            free.append(i)
            continue
        if task not in round_of:
            if not counts or counts[-1] >= capacity:
                order.append([])
                counts.append(0)
            round_of[task] = len(order) - 1
            counts[-1] += 1
        order[round_of[task]].append(i)
    if not order:
        return [free]
    order[0] = sorted(order[0] + free)
    return order
