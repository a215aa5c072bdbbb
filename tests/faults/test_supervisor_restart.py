"""The coordinator's supervisor restarts a SIGKILLed SuperLink (orchestration/supervisor.py):
the other child goes on, the dead child's detached descendants (Flower's SuperExec) are
stopped, and a child that keeps dying is given up after a bounded number of restarts.
Real processes; the supervisor runs in its own process (it installs signal handlers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_federation_live import alive, descendants

pytestmark = pytest.mark.faults

# A "SuperLink" that starts a detached "SuperExec" (its own session, as Flower does).
LINK = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
    "start_new_session=True); time.sleep(120)"
)
DRIVER = """
import sys
from orchestration.supervisor import RestartPolicy, supervise
link = [sys.executable, "-c", sys.argv[1]]
api = [sys.executable, "-c", "import time; time.sleep(120)"]
policy = RestartPolicy(names=("link",), max_in_a_row=2, first_delay=0.2)
code, first = supervise([("link", link), ("api", api)], {}, restart=policy, grace=5)
print("ENDED", first.name, code, flush=True)
sys.exit(code)
"""


def _by_script(root: int, marker: str) -> list[int]:
    found = []
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and alive(pid):
            found.append(pid)
    return sorted(found)


def _until(check, within: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.1)


def _driver(link: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, link],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path,
    )  # fmt: skip


def test_a_killed_child_is_restarted_and_its_leftovers_stopped(tmp_path: Path) -> None:
    driver = _driver(LINK, tmp_path)
    try:
        _until(lambda: len(_by_script(driver.pid, "time.sleep(120)")) == 3)  # link, exec, api
        link = _by_script(driver.pid, "start_new_session")[0]
        api = [p for p in _by_script(driver.pid, "time.sleep(120)") if p != link]
        time.sleep(1.0)  # the supervisor has seen the link's descendants
        leftovers = descendants(link)
        assert leftovers, "the link's detached child"
        os.kill(link, signal.SIGKILL)
        _until(lambda: [p for p in _by_script(driver.pid, "start_new_session") if p != link])
        _until(lambda: not any(alive(p) for p in leftovers), 10)  # the old SuperExec stopped
        assert all(alive(p) for p in api if p not in leftovers)  # the API never stopped
        assert driver.poll() is None
    finally:
        driver.terminate()
        out, _ = driver.communicate(timeout=30)
    assert "supervisor: the link exited with code -9" in out, out
    assert "restart 1 of at most 2 in a row" in out, out
    assert driver.returncode == 0, out  # a clean stop on SIGTERM


def test_a_child_that_keeps_dying_is_given_up(tmp_path: Path) -> None:
    driver = _driver("import sys; sys.exit(3)", tmp_path)
    out, _ = driver.communicate(timeout=120)
    assert out.count("starting it again") == 2, out
    assert "ENDED link 3" in out, out
    assert driver.returncode == 3
