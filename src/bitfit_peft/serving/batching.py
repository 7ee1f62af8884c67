"""Dynamic batching: requests that arrive together (any task) are run as one model call.

A single asyncio worker takes the oldest pending item, waits up to ``max_wait_ms`` (from that item's arrival) for
more items of the same *kind* (``key``: predict, or generate with identical generation settings) until
``max_batch_size`` are there, and runs them in one call of ``runner`` on a dedicated thread, so the event loop
keeps accepting requests. The pending queue is bounded: :meth:`DynamicBatcher.submit` raises
:class:`QueueFullError` instead of dropping anything.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchStats", "DynamicBatcher", "QueueFullError"]

#: runner(key, payloads) -> one result (or an Exception instance, failing just that item) per payload
Runner = Callable[[Hashable, list[Any]], Sequence[Any]]


class QueueFullError(RuntimeError):
    """The bounded request queue has no room for the submitted items."""


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


class DynamicBatcher:
    """Collect items into batches for ``runner``.

    Args:
        runner: called on the worker thread with ``(key, payloads)``; returns one result per payload (an
            ``Exception`` instance as a result fails only that item; raising fails the whole batch).
        max_batch_size: most items per call.
        max_wait_ms: how long the oldest item may wait for company before its batch runs.
        max_queue: most items waiting (not counting the batch being computed).
        task_of: optional ``payload -> task name`` used for the mixed-batch statistics.
    """

    def __init__(
        self,
        runner: Runner,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        task_of: Callable[[Any], str] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0.")
        self.runner = runner
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.task_of = task_of
        self.stats = BatchStats()
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
        items = [_Item(key, p, loop.create_future(), now) for p in payloads]
        self._pending.extend(items)
        self._wakeup.set()
        results = await asyncio.gather(*(it.future for it in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def _count(self, key: Hashable) -> int:
        return sum(1 for it in self._pending if it.key == key)

    def _take(self, key: Hashable) -> list[_Item]:
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        while self._pending:
            item = self._pending.popleft()
            if item.key == key and len(taken) < self.max_batch_size:
                taken.append(item)
            else:
                kept.append(item)
        self._pending = kept
        return [it for it in taken if not it.future.done()]  # drop items whose client went away

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
        payloads = [it.payload for it in batch]
        started = time.perf_counter()
        self.in_flight = len(batch)
        try:
            results = await loop.run_in_executor(self._executor, self.runner, key, payloads)
            if len(results) != len(batch):
                raise RuntimeError(f"Batch runner returned {len(results)} results for {len(batch)} items.")
        except Exception as err:  # noqa: BLE001 - fail this batch's requests, keep serving
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            self.in_flight = 0
            self._record(payloads, time.perf_counter() - started)
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
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
