"""Micro-batching: concurrent requests for one model share a forward pass.

A request's inputs join the model's open batch. The batch goes to the inference threads
when it is full, or once ``max_wait`` has passed *and* the model has a free slot: while
all of a model's slots are busy, arrivals keep joining the next batch instead of queueing
as many small ones, so batches grow with the load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

Rows = list[list[float]]  # one row of class probabilities per input


@dataclass
class _Pending:
    texts: list[str] = field(default_factory=list)
    waiters: list[tuple[int, int, asyncio.Future[Rows]]] = field(default_factory=list)


class MicroBatcher:
    """Coalesce concurrent ``submit`` calls into batches run by ``infer`` on ``executor``.

    Parameters
    ----------
    infer
        Blocking function: texts -> one probability row per text (runs off the event loop).
    executor
        Where ``infer`` runs (threads shared by all models).
    max_batch
        Inputs per forward pass; a single larger request still runs as one batch.
    max_wait
        Seconds the first input of a batch may wait for others.
    max_inflight
        Batches of this model running at once (about the inference threads available).
    on_batch
        Called with (inputs, requests) of every batch sent, for metrics.
    """

    def __init__(
        self,
        infer: Callable[[list[str]], Rows],
        *,
        executor: Executor,
        max_batch: int,
        max_wait: float,
        max_inflight: int = 1,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch should be at least 1.")
        if max_wait < 0:
            raise ValueError("max_wait should be zero or positive.")
        if max_inflight < 1:
            raise ValueError("max_inflight should be at least 1.")
        self._infer = infer
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_inflight = max_inflight
        self._on_batch = on_batch
        self._pending = _Pending()
        self._timer: asyncio.TimerHandle | None = None
        self._due = False  # the open batch has waited long enough; send at the next free slot
        self._inflight = 0

    async def submit(self, texts: Sequence[str]) -> Rows:
        """Probability rows for ``texts``, computed in some batch; order is preserved."""
        loop = asyncio.get_running_loop()
        if self._pending.texts and len(self._pending.texts) + len(texts) > self.max_batch:
            self._send(loop)  # keep batches within max_batch: this request opens the next one
        fut: asyncio.Future[Rows] = loop.create_future()
        start = len(self._pending.texts)
        self._pending.texts.extend(texts)
        self._pending.waiters.append((start, start + len(texts), fut))
        if len(self._pending.texts) >= self.max_batch or self.max_wait == 0:
            self._send(loop)
        elif self._timer is None and not self._due:
            self._timer = loop.call_later(self.max_wait, self._wait_over, loop)
        return await fut

    def _wait_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._inflight < self.max_inflight:
            self._send(loop)
        else:
            self._due = True

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = False
        batch, self._pending = self._pending, _Pending()
        if not batch.texts:
            return
        self._inflight += 1
        if self._on_batch is not None:
            self._on_batch(len(batch.texts), len(batch.waiters))
        task = loop.run_in_executor(self._executor, self._infer, batch.texts)
        task.add_done_callback(lambda t: self._done(loop, batch, t))

    def _done(
        self, loop: asyncio.AbstractEventLoop, batch: _Pending, task: asyncio.Future[Rows]
    ) -> None:
        self._inflight -= 1
        exc = None if task.cancelled() else task.exception()
        rows = None if exc is not None or task.cancelled() else task.result()
        for start, stop, fut in batch.waiters:
            if fut.done():  # the client went away
                continue
            if rows is not None:
                fut.set_result(rows[start:stop])
            else:
                fut.set_exception(exc or asyncio.CancelledError())
        if self._pending.texts and (self._due or len(self._pending.texts) >= self.max_batch):
            self._send(loop)
