"""Connection-level limits for ``fedtext serve``: what a reverse proxy would enforce.

uvicorn's httptools protocol (the fast parser ``fedtext serve`` uses) buffers a request
head of any size, waits for it and for the body forever, and takes every connection.
``GuardedHttpToolsProtocol`` adds, per connection:

- a head-size limit: a request line plus headers larger than ``max_header_bytes`` is
  answered 431 and the connection closed, before the rest is buffered;
- a head timeout: the head must arrive within ``header_timeout_s`` of the connection
  (or of the previous response), else 408 and close (slow-header clients); a connection
  that sent nothing is closed without a response;
- a body timeout: the body must arrive within ``body_timeout_s`` of the head, else 408
  (when no response has started) and close;
- a connection cap: beyond ``max_connections`` open connections a new one is answered
  503 and closed at once.

Every refusal is a JSON body. ``server_config`` builds the uvicorn config with it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.limits import Limits


def _response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size, head and body timeouts and a cap."""

    limits = Limits()  # replaced per server by ``guarded_protocol``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # bytes that arrive now belong to a request head
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    # -- timers

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        complete = self.cycle is None or self.cycle.response_complete
        if (what == "head" and self._head_bytes) or (
            what == "body" and not started and not complete
        ):
            # A connection that sent nothing is closed silently (as nginx does): a client
            # about to reuse an idle connection must not read a 408 for a request it never
            # sent.
            seconds = self.limits.header_timeout_s if what == "head" else self.limits.body_timeout_s
            self.transport.write(
                _response(
                    408, "Request Timeout", f"The request {what} took longer than {seconds:g} s."
                )
            )
        if self.cycle is not None and not complete:
            # The app reads a disconnect and its late answer goes nowhere.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    # -- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            transport.write(
                _response(
                    503,
                    "Service Unavailable",
                    f"This server holds its limit of {self.limits.max_connections} connections.",
                )
            )
            transport.close()
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.transport is not None:  # not refused by the connection cap
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed only what the limit allows: if the head is still not complete, it is too large.
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._in_head:
            self._disarm()
            self.transport.write(
                _response(
                    431,
                    "Request Header Fields Too Large",
                    f"The request line and headers exceed the limit of "
                    f"{self.limits.max_header_bytes} bytes.",
                )
            )
            self.transport.close()
            return
        super().data_received(data[room:])

    # -- parser callbacks

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.limits.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and not self.transport.is_closing():
            # The next request's head has its own deadline (uvicorn's keep-alive timeout,
            # shorter, closes an idle connection first).
            self._head_bytes = 0
            self._arm(self.limits.header_timeout_s, "head")


def guarded_protocol(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=`` option, bound to ``limits``."""
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,), {"limits": limits})


def server_config(
    app: Any, *, host: str, port: int, limits: Limits, **options: Any
) -> uvicorn.Config:
    """The uvicorn config of ``fedtext serve``: the guarded protocol, our logging."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        log_config=None,
        access_log=False,
        **options,
    )
