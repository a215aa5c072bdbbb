"""Run a few long-lived processes together (a SuperLink and the API, a SuperNode) and stop
them together: when one exits, or when this process is asked to stop.

A child named in ``restart`` (the coordinator's SuperLink) is started again when it dies,
with a growing delay, while the others go on: the API keeps answering through a SuperLink
crash. What the dead child left behind (Flower's SuperExec and ServerApp processes) is
stopped first, so two generations never share its ports or its state database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

# A child that ran this long before dying is restarted after the first delay again.
STABLE_SECONDS = 60.0


@dataclass
class Child:
    """One supervised process; ``seen`` holds the watched patterns its output contained."""

    name: str
    proc: subprocess.Popen[str]
    seen: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0  # restarts in a row, each within STABLE_SECONDS of its start


@dataclass(frozen=True)
class RestartPolicy:
    """Which children come back, how often in a row, and after how long."""

    names: Collection[str] = ()
    max_in_a_row: int = 5
    first_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** (attempt - 1))


def _pump(stream: IO[str], out: IO[str], seen: list[str], patterns: Sequence[str]) -> None:
    for line in stream:
        out.write(line)
        out.flush()
        seen.extend(p for p in patterns if p in line)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc), including those in other sessions."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_all(pids: Collection[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class _Supervisor:
    def __init__(
        self, env: dict[str, str], watch: Sequence[str], policy: RestartPolicy, log: IO[str]
    ) -> None:
        self.env, self.watch, self.policy, self.log = env, watch, policy, log
        self.children: list[Child] = []
        self.pumps: list[threading.Thread] = []
        self.below: dict[int, set[int]] = {}  # each child's descendants, last seen

    def start(self, name: str, cmd: list[str], restarts: int = 0) -> Child:
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
        )
        child = Child(name, proc, restarts=restarts)
        assert proc.stdout is not None
        pump = threading.Thread(
            target=_pump, args=(proc.stdout, sys.stdout, child.seen, self.watch), daemon=True
        )
        pump.start()
        self.pumps.append(pump)
        return child

    def remember(self) -> None:
        # A SIGKILLed process's children are re-parented at once: they are found only
        # from what was seen below it while it lived.
        for child in self.children:
            if child.name in self.policy.names and child.proc.poll() is None:
                self.below[child.proc.pid] = descendants(child.proc.pid)

    def may_restart(self, child: Child) -> bool:
        if child.name not in self.policy.names:
            return False
        lived = time.monotonic() - child.started
        in_a_row = 0 if lived >= STABLE_SECONDS else child.restarts
        return in_a_row < self.policy.max_in_a_row

    def restart(self, child: Child, cmd: list[str], stop: threading.Event) -> Child | None:
        lived = time.monotonic() - child.started
        attempt = 1 if lived >= STABLE_SECONDS else child.restarts + 1
        _kill_all(self.below.pop(child.proc.pid, set()))
        wait = self.policy.delay(attempt)
        print(
            f"supervisor: the {child.name} exited with code {child.proc.returncode} after "
            f"{lived:.0f} s; starting it again in {wait:.0f} s (restart {attempt} of at most "
            f"{self.policy.max_in_a_row} in a row)",
            file=self.log,
            flush=True,
        )
        if stop.wait(wait):
            return None
        return self.start(child.name, cmd, restarts=attempt)


def supervise(
    commands: Sequence[tuple[str, list[str]]],
    env: dict[str, str],
    watch: Sequence[str] = (),
    grace: float = 20.0,
    restart: RestartPolicy | None = None,
) -> tuple[int, Child]:
    """Run ``commands`` until one exits (and is not restarted) or a signal arrives; then
    stop the others.

    Returns the exit code and the child that ended first. A SIGTERM/SIGINT/SIGHUP is passed
    on as SIGTERM, then SIGKILL after ``grace`` seconds. Output is passed through; lines
    containing one of ``watch`` are remembered (to explain a failure). Children named in
    ``restart`` are started again when they die, up to ``max_in_a_row`` times in a row.
    """
    stop = threading.Event()
    policy = restart or RestartPolicy()
    cmds = dict(commands)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    sup = _Supervisor(env, watch, policy, sys.stderr)
    children = sup.children
    ended: Child | None = None
    try:
        for name, cmd in commands:
            children.append(sup.start(name, cmd))
        first: Child | None = None
        while first is None and not stop.is_set():
            sup.remember()
            ended = next((c for c in children if c.proc.poll() is not None), None)
            if ended is None:
                stop.wait(0.5)
            elif sup.may_restart(ended):
                again = sup.restart(ended, cmds[ended.name], stop)
                children.remove(ended)
                if again is None:  # asked to stop while waiting
                    break
                children.append(again)
            else:
                first = ended
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
        for pump in sup.pumps:
            pump.join(timeout=2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first is None:  # stopped by a signal: a clean shutdown
        shown = children[0] if children else ended
        assert shown is not None
        return 0, shown
    return first.proc.returncode or 0, first
