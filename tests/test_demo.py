"""The whole path with tiny settings: real Flower simulation, Opacus, AES-GCM, HTTP server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from sqlmodel import Session, select

from fedtext.bootstrap import platform_from_settings
from fedtext.demo import DEMO_EXAMPLES, DEMO_SENTENCES, print_report, run_demo
from fedtext.plaintext_scan import find_plaintext_weights, looks_like_safetensors
from fedtext.settings import Settings
from orchestration.simulation import SimulationConfig, SimulationFailed, simulate
from privacy.ledger import PrivacyEvent, verify_chain
from tenancy.tables import ModelVersion, Tenant

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_budget_refusal(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    console = Console(record=True, width=120)
    report = run_demo(
        data_dir,
        rounds=2,
        epsilon=2.0,
        max_train_examples=96,
        max_test_examples=32,
        budget_epsilon=2.2,
        batch_size=32,
        secure_mode=False,
        console=console,
    )
    print_report(report, console)
    out = console.export_text()
    assert [t.name for t in report.tenants] == ["acme", "globex", "initech"]
    for t in report.tenants:
        # The test count and the accuracy are as released: noised confusion counts (on 32
        # rows with noise SD 10 per count the released total may be 0), with intervals.
        assert t.train_examples == 96 and t.test_examples >= 0 and t.accuracy is not None
        assert t.metrics["accuracy_low"] <= t.accuracy <= t.metrics["accuracy_high"]
        # Training meets the target; the released evaluation is charged on top of it.
        assert 2.0 < t.spent_epsilon <= 2.2 and t.budget_epsilon == 2.2
        assert t.version == 1
        assert [p[0] for p in t.predictions] == DEMO_SENTENCES
        assert all(p[1] in ("negative", "neutral", "positive") for p in t.predictions)
        assert t.name in out and f"{t.name}: model encoder-head v1 (serving)" in out
        assert f"predict key (shown once): {t.predict_key}" in out
    assert report.predict_key_on_ledger_status == 403
    # The way to the console: its address, and each tenant's admin key to sign in with.
    assert "Console: http://127.0.0.1:8000/console/ (sign in with a tenant's admin key)" in out
    for t in report.tenants:
        assert f"{t.name} admin key (shown once): {t.admin_key}" in out

    # Nothing under the data directory holds plaintext weights.
    assert report.plaintext_files == [] and find_plaintext_weights(data_dir) == []
    blobs = sorted((data_dir / "blobs").rglob("*"))
    blob_files = [b for b in blobs if b.is_file()]
    # Three tenants' models; no checkpoint outlives a completed run (keep-head is off).
    assert len(blob_files) == 3 and report.encrypted_blobs == 3
    for blob in blob_files:
        assert not looks_like_safetensors(blob.read_bytes()[:16])

    platform = platform_from_settings(Settings(data_dir=data_dir))
    with Session(platform.engine) as session:
        events = session.exec(select(PrivacyEvent)).all()
        # each tenant charged once per dispatched round, once for personalization and
        # once for the released evaluation
        assert len(events) == 3 * (2 + 1 + 1)
        for tenant in session.exec(select(Tenant)).all():
            chain = sorted((e for e in events if e.tenant_id == tenant.id), key=lambda e: e.seq)
            assert verify_chain(chain) is None
        assert len(session.exec(select(ModelVersion)).all()) == 3

    # A second run at epsilon 2 would take every tenant past its budget of 2.2: refused
    # before any update is sent, and nothing more is charged.
    # The run's error names no tenant's figures (they are each tenant's own, issue 24).
    with pytest.raises(SimulationFailed, match=r"tenant 'acme' cannot take part \(budget\)"):
        simulate(
            platform,
            SimulationConfig(
                tenants=["acme", "globex", "initech"],
                rounds=2,
                epsilon=2.0,
                max_train_examples=96,
                max_test_examples=32,
                batch_size=32,
                secure_mode=False,
            ),
        )
    with Session(platform.engine) as session:
        assert len(session.exec(select(PrivacyEvent)).all()) == 12


def test_make_demo_is_quiet_fits_a_screen_and_a_half_and_classifies_clear_sentences_right(
    tmp_path: Path,
) -> None:
    """`fedtext demo` as `make demo` runs it, at its own settings: no library log line or
    warning reaches the terminal, under 80 lines, and every tenant's model gets every
    example right."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDTEXT_")}
    env.update(FEDTEXT_DATA_DIR=str(tmp_path / "var"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedtext"), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for noise in ("DEBUG", "INFO:", "Warning", "FutureWarning", "DeprecationWarning"):
        assert noise not in out, f"{noise!r} reached the terminal:\n{out}"
    lines = out.splitlines()
    assert len(lines) < 80, f"{len(lines)} lines:\n{out}"
    # Each released metric with its 95% interval, and epsilon explained.
    assert len(re.findall(r"\d\.\d{3} \(\d\.\d\d-\d\.\d\d\)", out)) == 6, out
    assert "Runs compose to less than their sum" in " ".join(out.split())
    expected = dict(DEMO_EXAMPLES)
    assert len(expected) >= 6 and set(expected.values()) == {"negative", "neutral", "positive"}
    for text in expected:  # printed in full, not cut
        assert text in out
    # Each sentence's line of answers: one "ok" per tenant, none wrong.
    assert "WRONG" not in out, out
    answers = re.findall(r"\b(?:acme|globex|initech) (\w+) \d\.\d\d (ok|WRONG)\b", out)
    assert len(answers) == len(expected) * 3 and all(mark == "ok" for _, mark in answers)
    # It ends with what to use next: a key per tenant and the lines to paste.
    assert out.count("predict key (shown once): ftk_") == 3
    assert "fedtext serve --port 8000" in out and out.count("curl -s -X POST") == 3
    log = tmp_path / "var" / "logs" / "fedtext.log"
    assert f"Library logs: {log.resolve()}" in out and log.stat().st_size > 0
