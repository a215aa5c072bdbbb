"""A workload that records its history: every request's time, status and answer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    at: float  # time.monotonic() when the answer (or the transport error) came
    status: int  # 0: no HTTP answer (connection refused or dropped)
    body: Any = None


@dataclass
class Load:
    """Predictions in a background thread until stopped; the history is kept."""

    url: str = ""
    keys: list[str] = field(default_factory=list)
    history: list[Event] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        i = 0
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                key = self.keys[i % len(self.keys)]
                i += 1
                # At most ~100 requests/s in all: under the API's per-key rate limit (a 429
                # is the limiter working, not a fault; an unpaced loop on a quiet machine
                # reached it once the warm path got faster).
                time.sleep(0.01)
                try:
                    r = client.post(
                        f"{self.url}/v1/models/sentiment/predict",
                        json={"inputs": ["the crew was lovely"], "top_k": 1},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    body = r.json() if r.status_code == 200 else r.text[:200]
                    self.history.append(Event(time.monotonic(), r.status_code, body))
                except httpx.TransportError:
                    self.history.append(Event(time.monotonic(), 0))
                    time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def server_errors_outside(self, start: float, end: float) -> list[Event]:
        return [e for e in self.history if e.status >= 500 and not start <= e.at <= end]

    def ok_after(self, moment: float) -> int:
        return sum(1 for e in self.history if e.at > moment and e.status == 200)
