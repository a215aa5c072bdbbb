"""Run a few long-lived processes together (a SuperLink and the API, a SuperNode) and stop
them together: when one exits, or when this process is asked to stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO


@dataclass
class Child:
    """One supervised process; ``seen`` holds the watched patterns its output contained."""

    name: str
    proc: subprocess.Popen[str]
    seen: list[str] = field(default_factory=list)


def _pump(stream: IO[str], out: IO[str], seen: list[str], patterns: Sequence[str]) -> None:
    for line in stream:
        out.write(line)
        out.flush()
        seen.extend(p for p in patterns if p in line)


def supervise(
    commands: Sequence[tuple[str, list[str]]],
    env: dict[str, str],
    watch: Sequence[str] = (),
    grace: float = 20.0,
) -> tuple[int, Child]:
    """Run ``commands`` until one exits or a signal arrives; then stop the others.

    Returns the exit code and the child that ended first. A SIGTERM/SIGINT/SIGHUP is passed
    on as SIGTERM, then SIGKILL after ``grace`` seconds. Output is passed through; lines
    containing one of ``watch`` are remembered (to explain a failure).
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    children: list[Child] = []
    pumps: list[threading.Thread] = []
    try:
        for name, cmd in commands:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                errors="replace",
            )
            child = Child(name, proc)
            children.append(child)
            assert proc.stdout is not None
            pump = threading.Thread(
                target=_pump, args=(proc.stdout, sys.stdout, child.seen, watch), daemon=True
            )
            pump.start()
            pumps.append(pump)
        first: Child | None = None
        while first is None and not stop.is_set():
            first = next((c for c in children if c.proc.poll() is not None), None)
            if first is None:
                stop.wait(0.5)
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        for pump in pumps:
            pump.join(timeout=2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first is None:  # stopped by a signal: a clean shutdown
        return 0, children[0]
    return first.proc.returncode or 0, first
