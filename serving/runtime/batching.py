from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

Rows = list[list[float]]  # one row of class probabilities per input
Span = tuple[int, int]  # one request's inputs in a batch: [start, stop)


class InputRejected(ValueError):
    """One input of a request cannot be processed (the tokenizer refused it): a 422.

    ``index`` is the input's position in the texts given to the function that raised it;
    ``run_isolated`` retries a request alone, so there it is the position in the request.
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"inputs[{index}] cannot be processed: {reason}")
        self.index = index
        self.reason = reason


def run_isolated(
    infer: Callable[[list[str]], Rows], texts: list[str], spans: Sequence[Span]
) -> list[Rows | Exception]:
    """Run one batch of several requests' inputs so that a bad request fails alone.

    The batch runs once; if it raises, each request (span) is run alone, so only the
    requests whose own inputs fail get an exception and the others their rows. Blocking:
    call it off the event loop. Returns, per span, its rows or the exception it raised.
    """
    try:
        rows = infer(texts)
    except Exception as exc:
        if len(spans) == 1:
            return [exc]
    else:
        return [rows[start:stop] for start, stop in spans]
    results: list[Rows | Exception] = []
    for start, stop in spans:
        try:
            results.append(infer(texts[start:stop]))
        except Exception as exc:
            results.append(exc)
    return results


Request = tuple[Any, list[str]]  # (whose request: a batcher's own tag, its inputs)


@dataclass
class _Pending:
    texts: list[str] = field(default_factory=list)
    waiters: list[tuple[Any, int, int, asyncio.Future[Rows]]] = field(default_factory=list)


class BatchQueue:
    """Coalesce concurrent requests into batches run by ``run_requests`` on ``executor``.

    A batch leaves when it holds ``max_batch`` inputs, or once ``max_wait`` has passed and
    one of ``max_inflight`` slots is free; while every slot is busy, arrivals join the
    next batch, so batches grow with the load. Subclasses say how a batch of requests is
    computed (``run_requests``: blocking, off the event loop, one result per request).

    Parameters
    ----------
    executor
        Where batches run (threads shared by all models).
    max_batch
        Inputs per batch; a single larger request still runs as one batch.
    max_wait
        Seconds the first input of a batch may wait for others.
    max_inflight
        Batches of this queue running at once (about the inference threads available).
    on_batch
        Called with (inputs, requests) of every batch sent, for metrics.
    """

    def __init__(
        self,
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
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_inflight = max_inflight
        self._on_batch = on_batch
        self._pending = _Pending()
        self._timer: asyncio.TimerHandle | None = None
        self._due = False  # the open batch has waited long enough; send at the next free slot
        self._inflight = 0

    def run_requests(self, requests: list[Request]) -> Sequence[Rows | BaseException]:
        """Each request's rows, or the exception its own inputs caused (blocking)."""
        raise NotImplementedError

    async def _enqueue(self, tag: Any, texts: Sequence[str]) -> Rows:
        """Probability rows for ``texts``, computed in some batch; order is preserved."""
        loop = asyncio.get_running_loop()
        if self._pending.texts and len(self._pending.texts) + len(texts) > self.max_batch:
            self._send(loop)  # keep batches within max_batch: this request opens the next one
        fut: asyncio.Future[Rows] = loop.create_future()
        start = len(self._pending.texts)
        self._pending.texts.extend(texts)
        self._pending.waiters.append((tag, start, start + len(texts), fut))
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
        requests = [(tag, batch.texts[a:b]) for tag, a, b, _ in batch.waiters]
        task = loop.run_in_executor(self._executor, self.run_requests, requests)
        task.add_done_callback(lambda t: self._done(loop, batch, t))

    def _done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: _Pending,
        task: asyncio.Future[Sequence[Rows | BaseException]],
    ) -> None:
        self._inflight -= 1
        exc = None if task.cancelled() else task.exception()
        results = None if exc is not None or task.cancelled() else task.result()
        for i, (_, _, _, fut) in enumerate(batch.waiters):
            if fut.done():  # the client went away
                continue
            result = results[i] if results is not None else (exc or asyncio.CancelledError())
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if self._pending.texts and (self._due or len(self._pending.texts) >= self.max_batch):
            self._send(loop)


class MicroBatcher(BatchQueue):
    """One model's batches: ``infer`` (blocking, texts -> one probability row per text)
    runs each batch once, and request by request if it fails (``run_isolated``)."""

    def __init__(self, infer: Callable[[list[str]], Rows], **options: Any) -> None:
        super().__init__(**options)
        self._infer = infer

    async def submit(self, texts: Sequence[str]) -> Rows:
        return await self._enqueue(None, texts)

    def run_requests(self, requests: list[Request]) -> list[Rows | Exception]:
        texts = [text for _, inputs in requests for text in inputs]
        spans, start = [], 0
        for _, inputs in requests:
            spans.append((start, start + len(inputs)))
            start += len(inputs)
        return run_isolated(self._infer, texts, spans)
