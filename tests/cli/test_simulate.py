"""`fedtext simulate` on a user's own files: a two-label spam/ham set, one file per tenant and
one file split over the tenants (real Flower simulation, Opacus, HTTP predictions)."""

from __future__ import annotations

import csv
import json
import random
import re
import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from typer.testing import CliRunner

from fedtext.bootstrap import platform_from_settings
from fedtext.cli import app
from fedtext.settings import Settings
from privacy.ledger import PrivacyEvent
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.tables import ModelVersion, Tenant

runner = CliRunner()

SPAM = (
    ["WIN a free", "Claim your free", "Congratulations! You won a", "Cheap", "URGENT: your"],
    ["iPhone", "cruise", "gift card", "loan", "prize"],
    ["click here now", "reply STOP to opt out", "call 0800 now", "offer ends today"],
)
HAM = (
    ["Are we still on for", "Can you send me", "Thanks for", "See you at", "Don't forget"],
    ["lunch tomorrow", "the meeting notes", "dinner last night", "the station at six"],
    ["?", ", thanks.", " - love, Sam", "."],
)


def spam_ham_file(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["text", "label"])
        for i in range(rows):
            if i % 2:
                a, b, c = (rng.choice(part) for part in SPAM)
                out.writerow([f"{a} {b}, {c}", "spam"])
            else:
                a, b, c = (rng.choice(part) for part in HAM)
                out.writerow([f"{a} {b}{c}", "ham"])
    return path


TINY = ["--rounds", "3", "--personalize-epochs", "1", "--insecure"]


def _keys(output: str) -> dict[str, str]:
    return dict(
        re.findall(r"(?m)^(\S+): model .*\n  predict key \(shown once\): (ftk_\S+)", output)
    )


@pytest.mark.slow
def test_simulate_trains_named_tenants_on_their_own_spam_ham_files(
    data_dir: Path, tmp_path: Path
) -> None:
    acme = spam_ham_file(tmp_path / "acme.csv", 400, 1)
    globex = spam_ham_file(tmp_path / "globex.csv", 400, 2)
    first = runner.invoke(
        app,
        [
            "simulate",
            "--data",
            f"acme={acme}",
            "--data",
            f"globex={globex}",
            "--epsilon",
            "6",
            *TINY,
        ],
    )
    assert first.exit_code == 0, first.output
    # Labels read from the files; the tenants created; each ends with a key and the lines
    # to serve and query it.
    assert "Training examples: acme 320, globex 320; labels: ham, spam." in first.output
    assert "Created tenant acme" in first.output and "Created tenant globex" in first.output
    assert "fedtext serve --port 8000" in first.output
    keys = _keys(first.output)
    assert set(keys) == {"acme", "globex"}
    assert f'-H "Authorization: Bearer {keys["acme"]}"' in first.output
    assert not re.search(r"\d\.\d{5,}", first.output), "numbers are rounded for reading"
    # Each released metric with its 95% interval; epsilon explained after the run.
    assert "accuracy (95%)" in first.output
    assert re.search(r"\d\.\d{3} \(\d\.\d\d-\d\.\d\d\)", first.output)
    flat = " ".join(first.output.split())
    assert "training meets it from below" in flat
    assert re.search(r"two like this cost \d\.\d\d, not \d", flat)

    # One file split over the same (now existing) tenants, labels named in another order.
    shared = spam_ham_file(tmp_path / "all.csv", 800, 3)
    second = runner.invoke(
        app,
        ["simulate", "--data", str(shared), "--tenant", "acme", "--tenant", "globex",
         "--labels", "spam,ham", "--epsilon", "2", *TINY],
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    assert "Training examples: acme 320, globex 320; labels: spam, ham." in second.output
    assert "Created tenant" not in second.output
    # The tenants have live predict keys now: none is made again.
    assert "your existing key" in second.output and not _keys(second.output)

    platform = platform_from_settings(Settings(data_dir=data_dir))
    with Session(platform.engine) as session:
        versions = session.exec(select(ModelVersion).order_by(ModelVersion.version)).all()
        assert sorted(v.version for v in versions) == [1, 1, 2, 2]
        for v in versions:  # the if-better decision is recorded on every version
            decision = json.loads(v.metrics_json)["deploy"]
            assert decision["policy"] == "if-better"
            if v.version == 1:
                assert decision["deployed"] and decision["reason"] == "first version"
            else:
                assert decision["compared_with"] == 1 and v.deployed == decision["deployed"]
                assert "held-out macro-F1" in decision["reason"]
        assert len(session.exec(select(Tenant)).all()) == 2

    # The served models (whichever version serves) tell spam from ham.
    client = TestClient(create_app(platform, ServingConfig(operator_token=secrets.token_hex(16))))
    with client:
        for tenant, key in keys.items():
            resp = client.post(
                "/v1/models/encoder-head/predict",
                json={
                    "inputs": ["WIN a free cruise, click here now", "See you at lunch tomorrow?"]
                },
                headers={"Authorization": f"Bearer {key}"},
            )
            assert resp.status_code == 200, resp.text
            labels = [p[0]["label"] for p in resp.json()["predictions"]]
            assert labels == ["spam", "ham"], (tenant, resp.json())


def test_simulate_checks_size_batch_and_labels_before_anything_trains(
    data_dir: Path, tmp_path: Path
) -> None:
    small = spam_ham_file(tmp_path / "small.csv", 100, 1)
    other = tmp_path / "other.csv"
    other.write_text(
        "text,label\n" + "".join(f"row {i},{('a', 'b', 'c')[i % 3]}\n" for i in range(90))
    )

    too_small = runner.invoke(
        app,
        ["simulate", "--data", f"acme={small}", "--data", f"globex={small}", "--batch-size", "128"],
    )
    assert too_small.exit_code == 2, too_small.output
    assert (
        "tenant 'acme' has 80 training examples, fewer than the batch size 128" in too_small.output
        and "use batch size 16 (--batch-size 16) or add data" in too_small.output
    )
    differ = runner.invoke(
        app, ["simulate", "--data", f"acme={small}", "--data", f"globex={other}"]
    )
    assert differ.exit_code == 2
    assert "acme: ham, spam; globex: a, b, c" in differ.output
    assert "--labels a,b,c,ham,spam" in differ.output
    unknown = runner.invoke(
        app,
        [
            "simulate",
            "--data",
            f"acme={small}",
            "--data",
            f"globex={small}",
            "--labels",
            "ham,eggs",
        ],
    )
    assert unknown.exit_code == 2 and "unknown label 'spam'" in unknown.output
    assert "--labels" in unknown.output
    mixed = runner.invoke(app, ["simulate", "--data", str(small), "--data", f"globex={small}"])
    assert mixed.exit_code == 2 and "--data TENANT=FILE for every tenant" in mixed.output
    missing = runner.invoke(app, ["simulate", "--data", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 2 and "Data file not found" in missing.output
    for result in (too_small, differ, unknown, mixed, missing):
        assert "Traceback" not in result.output
    # Nothing was created, trained or charged.
    platform = platform_from_settings(Settings(data_dir=data_dir))
    with Session(platform.engine) as session:
        assert session.exec(select(Tenant)).all() == []
        assert session.exec(select(PrivacyEvent)).all() == []


@pytest.mark.slow
def test_a_run_over_budget_is_refused_before_any_progress_bar(
    data_dir: Path, tmp_path: Path
) -> None:
    for name in ("acme", "globex"):
        made = runner.invoke(app, ["tenant", "create", name, "--budget-epsilon", "1"])
        assert made.exit_code == 0, made.output
    data = spam_ham_file(tmp_path / "all.csv", 400, 2)
    refused = runner.invoke(
        app,
        ["simulate", "--data", str(data), "--tenant", "acme", "--tenant", "globex",
         "--epsilon", "3", *TINY],
    )  # fmt: skip
    assert refused.exit_code == 2, refused.output
    out = " ".join(refused.output.split())
    assert "does not fit the privacy budget (nothing was trained or charged)" in out
    assert "tenant 'acme' would exceed budget: budget epsilon 1.000" in out
    assert "fedtext tenant budget acme --epsilon E --reason R" in out
    # Refused before Flower started: no progress bar, no round table, nothing charged.
    assert "rounds" not in out and "Traceback" not in out
    platform = platform_from_settings(Settings(data_dir=data_dir))
    with Session(platform.engine) as session:
        assert session.exec(select(PrivacyEvent)).all() == []
