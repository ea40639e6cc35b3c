"""Dynamic micro-batching: a bounded queue of prepared images and the one task that runs them through the
model in batches, as soon as a batch is full or the oldest image has waited `max_wait_ms`, in a thread of
its own so the event loop goes on accepting and decoding. Admission is all or nothing and refused at once
when the queue is full; an image whose deadline passed before its turn is answered, not run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .metrics import Metrics

log = logging.getLogger("resforge")


class QueueFull(Exception):
    """No room in the queue for a request's images."""


class DeadlineExceeded(Exception):
    """A request's deadline passed before its images reached the model."""


class ShuttingDown(Exception):
    """The server is draining its queue and takes no new work."""


@dataclass
class Item:
    x: torch.Tensor
    deadline: float
    enqueued: float
    future: asyncio.Future


class Batcher:
    """A bounded queue of prepared images and the task that runs them through the model in batches."""

    def __init__(self, run: Callable[[list[torch.Tensor]], Sequence[Any]], max_batch: int, max_wait_ms: float,
                 capacity: int, metrics: Metrics):
        """`run`: a batch of prepared images of one shape in, one result each out (`Service.run`)."""
        self.run, self.max_batch, self.max_wait, self.capacity = run, max_batch, max_wait_ms / 1000, capacity
        self.metrics = metrics
        self.pending: deque[Item] = deque()
        self.wakeup = asyncio.Event()
        self.closing = False
        self.arriving = 0  # requests being read and decoded: the only ones that could still join a batch
        self.reserved = 0  # images admitted and being decoded: they count against the capacity too
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="resforge-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    @contextlib.contextmanager
    def arrival(self):
        """Around a request's reading and decoding: while none is under way, nothing waits for a fuller batch."""
        self.arriving += 1
        self.metrics.arriving.set(self.arriving)
        try:
            yield
        finally:
            self.arriving -= 1
            self.metrics.arriving.set(self.arriving)
            self.wakeup.set()

    @contextlib.contextmanager
    def admission(self, count: int):
        """Room for a request's images, all or none, held while they are decoded: raises QueueFull at once
        when the queue and what is being decoded leave too little, so an overloaded server refuses before
        it spends anything on the request."""
        if self.closing:
            raise ShuttingDown
        if len(self.pending) + self.reserved + count > self.capacity:
            raise QueueFull
        self.reserved += count
        try:
            yield
        finally:
            self.reserved -= count

    def submit(self, xs: list[torch.Tensor], deadline: float) -> list[asyncio.Future]:
        """Queue a request's decoded images (within the room `admission` held for them)."""
        if self.closing:
            raise ShuttingDown
        loop, now = asyncio.get_running_loop(), time.monotonic()
        items = [Item(x, deadline, now, loop.create_future()) for x in xs]
        self.pending.extend(items)
        self.metrics.queue_depth.set(len(self.pending))
        self.wakeup.set()
        return [item.future for item in items]

    async def close(self) -> None:
        """Take no new work, run what is queued, then stop."""
        self.closing = True
        self.wakeup.set()
        if self.task is not None:
            await self.task
        self.model_thread.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                if self.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            wait = self.pending[0].enqueued + self.max_wait - time.monotonic()
            full = len(self.pending) >= self.max_batch
            if not full and wait > 0 and self.arriving and not self.closing:
                self.wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), wait)
                continue
            batch = self._take()
            if batch:
                await self._compute(batch, "full" if full else "timeout" if wait <= 0 else "idle")

    def _take(self) -> list[Item]:
        """Up to max_batch queued images of one shape, in order; the expired are answered, the abandoned dropped."""
        now, batch, rest = time.monotonic(), [], deque()
        while self.pending:
            item = self.pending.popleft()
            if item.future.done():  # the client went away
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded())
                continue
            if len(batch) < self.max_batch and (not batch or item.x.shape == batch[0].x.shape):
                batch.append(item)
            else:
                rest.append(item)
        self.pending = rest
        self.metrics.queue_depth.set(len(self.pending))
        return batch

    async def _compute(self, batch: list[Item], trigger: str) -> None:
        start = time.monotonic()
        for item in batch:
            self.metrics.queue_seconds.observe(start - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batches.labels(trigger).inc()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, self.run, [item.x for item in batch])
        except Exception as e:  # a model failure is every waiting request's 500, not the batcher's end
            log.exception("inference failed on a batch of %d", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        seconds = time.monotonic() - start
        self.metrics.inference_seconds.observe(seconds)
        for item, result in zip(batch, results):
            if not item.future.done():
                item.future.set_result((result, {"queue": 1000 * (start - item.enqueued), "inference": 1000 * seconds,
                                            "batch": len(batch)}))

