"""The README's "Command line" block, run as written in a new directory: it must end in a
prediction for the tenant it created (real CLI processes, Flower simulation and server)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtext.server_thread import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Tiny run settings, through the environment variables every run option reads.
TINY = {
    "FEDTEXT_RUN_ROUNDS": "2",
    "FEDTEXT_RUN_PERSONALIZE_EPOCHS": "1",
    "FEDTEXT_RUN_MAX_TRAIN_EXAMPLES": "96",
    "FEDTEXT_RUN_MAX_TEST_EXAMPLES": "32",
}


def command_line_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Command line\n", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the Command line section has no bash block"
    return match.group(1)


def test_readme_command_line_block_ends_in_a_prediction(tmp_path: Path) -> None:
    block = command_line_block()
    assert "fedtext simulate --tenant acme" in block and "curl" in block
    # As written, but with the repository's virtual environment and a free port (other
    # tests may hold 8000); nothing else changes.
    port = str(free_port())
    script = block.replace(
        "source .venv/bin/activate", f"source {Path(sys.executable).parent}/activate"
    ).replace("8000", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDTEXT_")}
    env.update(TINY, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # The last command's answer: acme's model classifies the sentence.
    answer = json.loads([line for line in done.stdout.splitlines() if '"predictions"' in line][-1])
    assert answer["model"] == "encoder-head" and answer["version"] == 1
    (top,) = answer["predictions"]
    assert len(top) == 2 and top[0]["label"] in ("negative", "neutral", "positive")
    assert top[0]["score"] >= top[1]["score"]
    # simulate ended with what to paste; the block's own key was acme's, so simulate made
    # a key only for globex, and no library log or warning reached the terminal.
    assert "fedtext serve --port" in out and "globex: model encoder-head v1 (serving)" in out
    assert "acme: model encoder-head v1 (serving)" in out and "your existing key" in out
    for noise in ("DEBUG", "INFO:", "Warning", "FutureWarning", "DeprecationWarning"):
        assert noise not in out, f"{noise!r} reached the terminal:\n{out}"
    assert "Running upgrade" not in out  # Alembic's INFO lines stay in the log file
    assert (tmp_path / "acme.html").stat().st_size > 1000
    assert (tmp_path / "var" / "logs" / "fedtext.log").stat().st_size > 0
