"""Dynamic batching: requests that arrive together (any task) are run as one model call.

A single asyncio worker takes the oldest pending item, waits up to ``max_wait_ms`` (from that item's arrival) for
more items of the same *kind* (``key``: predict, or generate with identical generation settings) until
``max_batch_size`` are there, and runs them in one call of ``runner`` on a dedicated thread, so the event loop
keeps accepting requests.

Admission and fairness (``docs/security.md#limits``): the pending queue is bounded (:meth:`DynamicBatcher.submit`
raises :class:`QueueFullError`, HTTP 429, instead of dropping anything) and an item that waited longer than
``queue_timeout_s`` fails with :class:`QueueTimeoutError` (HTTP 503); both carry ``Retry-After``. With ``cost_of``
and ``budget_of``, a batch holds at most ``budget`` padded cost (items x the costliest). Every :meth:`submit` is a
*flow*: a batch takes items from the flows that were served the least cost so far first, one at a time in turn,
and an item much costlier than the batch's first does not join it, so a request of 256 long inputs is split over
many batches and cannot hold back the small requests that arrive behind it.

Interleaving (with ``interleave``): a ``generate`` batch runs for as many model steps as it makes tokens, and a
long forward for many blocks, so between two transformer blocks of the running batch (``interleave.py``) the worker
runs the waiting items that are much cheaper than that batch's costliest (at most ``1/_MIX_RATIO`` of it) and need
no adapter load, as a batch of their own, then resumes the long one: a short request waits about one block, not a
whole 512-token beam search or a forward over 512-token pairs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bitfit_peft.serving.interleave import SetAside, step_hook

__all__ = ["BatchStats", "DynamicBatcher", "QueueFullError", "QueueTimeoutError"]

#: runner(key, payloads) -> one result (or an Exception instance, failing just that item) per payload
Runner = Callable[[Hashable, list[Any]], Sequence[Any]]


class QueueFullError(RuntimeError):
    """The bounded request queue has no room for the submitted items."""


class QueueTimeoutError(RuntimeError):
    """An item waited longer than the queue deadline for its batch."""


#: an item may join a batch only if its cost is at most this many times the batch's first item's (or _MIX_FLOOR)
_MIX_RATIO, _MIX_FLOOR = 4, 64
#: most batches nested inside each other's model calls (each at most 1/_MIX_RATIO of the cost of the one it is in)
_MAX_DEPTH = 3


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    mixed_task_batches: int = 0
    rejected: int = 0
    last_batch_tasks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "largest_batch": self.largest_batch,
            "mixed_task_batches": self.mixed_task_batches,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "rejected_items": self.rejected,
        }


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    arrived: float
    flow: int = 0
    cost: int = 1


def _no_work(_set_aside: SetAside) -> None:
    """The step hook of a batch nested as deep as allowed: nothing runs inside it."""


class DynamicBatcher:
    """Collect items into batches for ``runner``.

    Args:
        runner: called on the worker thread with ``(key, payloads)``; returns one result per payload (an
            ``Exception`` instance as a result fails only that item; raising fails the whole batch).
        max_batch_size: most items per call.
        max_wait_ms: how long the oldest item may wait for company before its batch runs.
        max_queue: most items waiting (not counting the batch being computed).
        task_of: optional ``payload -> task name`` used for the mixed-batch statistics.
        cost_of / budget_of: ``payload -> cost`` and ``key -> most padded cost per batch`` (None: no budget).
        queue_timeout_s: an item waiting longer fails with :class:`QueueTimeoutError` (None: no deadline).
        interleave: ``payload -> bool``, whether the item may run between the transformer blocks of a costlier batch
            (its adapter is resident: nothing to load); None: never interleave.
    """

    def __init__(
        self,
        runner: Runner,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        task_of: Callable[[Any], str] | None = None,
        cost_of: Callable[[Any], int] | None = None,
        budget_of: Callable[[Hashable], int] | None = None,
        queue_timeout_s: float | None = None,
        interleave: Callable[[Any], bool] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0.")
        self.runner = runner
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.task_of, self.cost_of, self.budget_of = task_of, cost_of, budget_of
        self.queue_timeout = queue_timeout_s
        self.interleave = interleave
        self.stats = BatchStats()
        self._closing = False
        self._next_look = 0.0  #: monotonic time before which a block boundary does not look for work again
        self._flows = 0
        self._served: dict[int, int] = {}  #: cost served so far per flow with items waiting
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.in_flight = 0  # items of the batch being computed

    @property
    def depth(self) -> int:
        """Items waiting to be batched."""
        return len(self._pending)

    def waiting_tasks(self) -> list[str]:
        """Task names of the waiting items (with ``task_of``; for metrics)."""
        return [self.task_of(it.payload) for it in list(self._pending)] if self.task_of is not None else []

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitfit-batcher")
        self._task = asyncio.create_task(self._run(), name="bitfit-batcher")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("The server is shutting down."))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, key: Hashable, payloads: Sequence[Any]) -> list[Any]:
        """Queue ``payloads`` (all or none) and wait for their results, in order.

        Raises :class:`QueueFullError` when they do not fit, or the first per-item exception.
        """
        if self._wakeup is None or self._task is None:
            raise RuntimeError("DynamicBatcher.start() has not been awaited.")
        if self._task.done():
            raise RuntimeError("The batching worker has stopped.")
        if len(self._pending) + len(payloads) > self.max_queue:
            self.stats.rejected += len(payloads)
            raise QueueFullError(
                f"Request queue is full ({len(self._pending)} of {self.max_queue} items waiting, this request "
                f"has {len(payloads)}); retry shortly."
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._flows += 1
        cost = self.cost_of or (lambda _: 1)
        items = [_Item(key, p, loop.create_future(), now, self._flows, int(cost(p))) for p in payloads]
        self._pending.extend(items)
        self._wakeup.set()
        results = await asyncio.gather(*(it.future for it in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def _count(self, key: Hashable) -> int:
        return sum(1 for it in self._pending if it.key == key)

    def _take(self, key: Hashable, eligible: Callable[[_Item], bool] | None = None) -> list[_Item]:
        """The next batch of ``key`` (of ``eligible`` items): least-served flows first, in turn, within the size and
        cost budgets."""
        self._expire()
        flows: dict[int, deque[_Item]] = {}
        for item in self._pending:
            if item.key == key and (eligible is None or eligible(item)):
                flows.setdefault(item.flow, deque()).append(item)
        budget = self.budget_of(key) if self.budget_of is not None else None
        order = sorted(flows, key=lambda f: (self._served.get(f, 0), f))
        taken: list[_Item] = []
        widest = 0
        while order and len(taken) < self.max_batch_size:
            for flow in list(order):
                item = flows[flow][0]
                if taken and not self._fits(item, taken, widest, budget):
                    order.remove(flow)
                    continue
                taken.append(flows[flow].popleft())
                widest = max(widest, item.cost)
                if not flows[flow]:
                    order.remove(flow)
                if len(taken) >= self.max_batch_size:
                    break
        chosen = {id(it) for it in taken}
        self._pending = deque(it for it in self._pending if id(it) not in chosen)
        for item in taken:
            self._served[item.flow] = self._served.get(item.flow, 0) + item.cost
        waiting = {it.flow for it in self._pending}
        self._served = {f: c for f, c in self._served.items() if f in waiting}
        return [it for it in taken if not it.future.done()]  # drop items whose client went away

    @staticmethod
    def _fits(item: _Item, taken: list[_Item], widest: int, budget: int | None) -> bool:
        if budget is not None and (len(taken) + 1) * max(widest, item.cost) > budget:
            return False
        return item.cost <= max(_MIX_RATIO * taken[0].cost, _MIX_FLOOR)

    def _expire(self) -> None:
        """Fail the items that waited past the queue deadline (HTTP 503 + Retry-After)."""
        if self.queue_timeout is None or not self._pending:
            return
        now = asyncio.get_running_loop().time()
        late = [it for it in self._pending if now - it.arrived > self.queue_timeout]
        if not late:
            return
        self._pending = deque(it for it in self._pending if now - it.arrived <= self.queue_timeout)
        for item in late:
            if not item.future.done():
                item.future.set_exception(QueueTimeoutError(
                    f"The request waited more than {self.queue_timeout:g} s (queue_timeout_s) for the engine; the "
                    "server is overloaded, retry shortly."))

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            deadline = first.arrived + self.max_wait
            while self._count(first.key) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(first.key)
            if not batch:
                continue
            await self._run_batch(loop, first.key, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, key: Hashable, batch: list[_Item]) -> None:
        self.in_flight = len(batch)
        try:
            results = await loop.run_in_executor(self._executor, self._compute, loop, key, batch, 0)
        finally:
            self.in_flight = 0
        self._deliver(batch, results)

    def _compute(self, loop: asyncio.AbstractEventLoop, key: Hashable, batch: list[_Item],
                 depth: int) -> Sequence[Any] | Exception:
        """Run one batch on the worker thread (its results, or the exception failing all of it); with
        ``interleave``, cheaper waiting batches run between its transformer blocks (:meth:`_between_steps`)."""
        payloads = [it.payload for it in batch]
        started = time.perf_counter()
        try:
            if self.interleave is None:
                results = self.runner(key, payloads)
            else:  # the deepest batches run with a hook that does nothing (not the one of the batch they are in)
                widest = max(it.cost for it in batch)
                hook = partial(self._between_steps, loop, widest, depth) if depth < _MAX_DEPTH else _no_work
                with step_hook(hook):
                    results = self.runner(key, payloads)
            if len(results) != len(batch):
                raise RuntimeError(f"Batch runner returned {len(results)} results for {len(batch)} items.")
            return results
        except Exception as err:  # noqa: BLE001 - fail this batch's requests, keep serving
            return err
        finally:
            loop.call_soon_threadsafe(self._record, payloads, time.perf_counter() - started)

    def _between_steps(self, loop: asyncio.AbstractEventLoop, widest: int, depth: int, set_aside: SetAside) -> None:
        """Between two blocks of a batch costing up to ``widest`` (worker thread): run the waiting items
        that cost at most ``widest / _MIX_RATIO`` and need no load as a batch, with the running call set aside."""
        if self._closing or not self._pending or time.monotonic() < self._next_look:
            return
        try:
            taken = asyncio.run_coroutine_threadsafe(self._take_between(widest), loop).result(timeout=1.0)
        except Exception:  # noqa: BLE001 - the loop is stopping: the running batch just goes on
            return
        if taken is None:
            self._next_look = time.monotonic() + min(self.max_wait, 0.002)
            return
        key, batch = taken
        self.in_flight += len(batch)
        try:
            with set_aside():
                results = self._compute(loop, key, batch, depth + 1)
        finally:
            self.in_flight -= len(batch)
        loop.call_soon_threadsafe(self._deliver, batch, results)

    async def _take_between(self, widest: int) -> tuple[Hashable, list[_Item]] | None:
        """On the event loop: the batch to run between two blocks, once it waited ``max_wait`` for company."""
        assert self.interleave is not None
        ready = self.interleave

        def eligible(item: _Item) -> bool:
            return item.cost * _MIX_RATIO <= widest and ready(item.payload)

        candidates = [it for it in self._pending if eligible(it)]
        if not candidates:
            return None
        first = candidates[0]
        gathered = sum(1 for it in candidates if it.key == first.key) >= self.max_batch_size
        if not gathered and asyncio.get_running_loop().time() - first.arrived < self.max_wait:
            return None
        batch = self._take(first.key, eligible)
        return (first.key, batch) if batch else None

    def _deliver(self, batch: list[_Item], results: Sequence[Any] | Exception) -> None:
        """On the event loop: each item's result, or the exception failing the batch."""
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            result = results if isinstance(results, Exception) else results[i]
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _record(self, payloads: list[Any], _seconds: float) -> None:
        stats = self.stats
        stats.batches += 1
        stats.items += len(payloads)
        stats.largest_batch = max(stats.largest_batch, len(payloads))
        if self.task_of is not None:
            tasks = [self.task_of(p) for p in payloads]
            stats.last_batch_tasks = tasks
            if len(set(tasks)) > 1:
                stats.mixed_task_batches += 1
