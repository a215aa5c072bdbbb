"""`fedtext simulate --privacy-unit user` end to end (issue 29): a real Flower simulation
on files with a user column; every ledger entry says privacy_unit user with k; the
refusals (no user column, too few users) come before anything trains, saying why."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from clients.data import load_labeled_file, train_test_split
from fedtext.bootstrap import platform_from_settings
from fedtext.cli import app
from fedtext.settings import Settings
from privacy.ledger import PrivacyEvent
from privacy.params import dp_batch_size, poisson_schedule
from tests.cli.test_simulate import HAM, SPAM

runner = CliRunner()
TINY = ["--rounds", "2", "--personalize-epochs", "1", "--insecure"]


def users_file(path: Path, rows: int, seed: int, *, column: str = "user") -> Path:
    """Spam/ham rows written by users of 1 to 12 rows each (skewed)."""
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["text", "label", column])
        user, left = 0, 0
        for i in range(rows):
            if left == 0:
                user, left = user + 1, min(12, int(rng.paretovariate(1.0)))
            left -= 1
            parts = SPAM if i % 2 else HAM
            a, b, c = (rng.choice(p) for p in parts)
            out.writerow([f"{a} {b} {c} #{i}", "spam" if i % 2 else "ham", f"{path.stem}-{user}"])
    return path


@pytest.mark.slow
def test_a_user_level_simulation_records_the_unit_and_k_on_every_entry(
    data_dir: Path, tmp_path: Path
) -> None:
    acme = users_file(tmp_path / "acme.csv", 900, 1)
    globex = users_file(tmp_path / "globex.csv", 900, 2)
    result = runner.invoke(
        app,
        ["simulate", "--data", f"acme={acme}", "--data", f"globex={globex}",
         "--privacy-unit", "user", "--max-examples-per-user", "4", "--epsilon", "8", *TINY],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    platform = platform_from_settings(Settings(data_dir=data_dir))
    with Session(platform.engine) as session:
        entries = list(session.exec(select(PrivacyEvent)))
    assert len(entries) >= 2 * (2 + 2)  # per tenant: 2 rounds, personalize, evaluation
    assert {e.privacy_unit for e in entries} == {"user"}
    # The nodes trained over users: q = 1 / ceil(users / batch), batch sized by the users
    # (an example-level node would have stated 720 examples: batch 72, q = 0.1).
    for tenant_file in (acme, globex):
        train, _ = train_test_split(load_labeled_file(tenant_file, ("ham", "spam"), "user"), 0.2, 7)
        n_users = train.num_users()
        rate = poisson_schedule(n_users, dp_batch_size(n_users, 0), 1)[0]
        assert any(e.sample_rate == pytest.approx(rate) for e in entries if e.purpose == "train")
    assert not any(e.sample_rate == pytest.approx(0.1) for e in entries)
    for e in entries:
        applied = json.loads(e.applied_json)
        assert applied["privacy_unit"] == "user" and applied["max_examples_per_user"] == 4
        if e.purpose == "evaluate":
            assert e.clip_norm == 4.0  # a user moves up to k counts: sensitivity k
        else:
            assert e.clip_norm == 1.0


def test_user_level_refusals_come_before_anything_trains(data_dir: Path, tmp_path: Path) -> None:
    plain = users_file(tmp_path / "plain.csv", 200, 3, column="author")
    no_column = runner.invoke(
        app,
        ["simulate", "--data", f"acme={plain}", "--data", f"globex={plain}",
         "--privacy-unit", "user", *TINY],
    )  # fmt: skip
    assert no_column.exit_code != 0
    assert "missing column(s) user" in " ".join(no_column.output.split())
    few = users_file(tmp_path / "few.csv", 120, 4)
    too_few = runner.invoke(
        app,
        ["simulate", "--data", f"acme={few}", "--data", f"globex={few}", "--batch-size", "8",
         "--privacy-unit", "user", "--epsilon", "0.1", *TINY],
    )  # fmt: skip
    assert too_few.exit_code != 0
    flat = " ".join(too_few.output.split())
    assert "users: epsilon 0.1" in flat and "fits epsilon" in flat, flat
    assert "Traceback" not in too_few.output
    demo = runner.invoke(app, ["simulate", "--privacy-unit", "user", *TINY])
    assert demo.exit_code != 0 and "demo corpus names no authors" in " ".join(demo.output.split())
