"""Authorship an auditor can trust (issue 24, findings 4 and 5), through the real CLI.

A database-only attacker (plain SQL, the public hashing recipe, no key) appends a correctly
hashed budget raise, rewrites and re-hashes the charges made after the auditor's last
kept head, and mints an admin key row: `fedtext audit verify` (a real subprocess, with and
without --head) names each, and the API refuses the minted key. A KEK rotation keeps every
signature and every head exported before it verifiable.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from fedtext.bootstrap import platform_from_settings
from fedtext.cli import app
from fedtext.settings import Settings
from privacy.heads import HeadSigner, heads_file, read_heads, sign_and_store
from privacy.ledger import BudgetChange, PrivacyEvent, entry_digest, record_event
from privacy.params import DPParams
from tenancy.db import session_scope
from tenancy.key_providers import LEGACY_HEAD_PURPOSE
from tenancy.tenants import get_tenant

runner = CliRunner()
FEDTEXT = [str(Path(sys.executable).parent / "fedtext")]


@pytest.fixture
def env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """acme (budget 8) with two signed charges and an admin key, made through the platform."""
    monkeypatch.setenv("FEDTEXT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDTEXT_DATABASE_URL", database_url)
    made = runner.invoke(app, ["tenant", "create", "acme", "--budget-epsilon", "8"])
    assert made.exit_code == 0, made.output
    _charge(tmp_path, database_url, rounds=(1, 2))
    return {**os.environ, "FEDTEXT_DATA_DIR": str(tmp_path), "FEDTEXT_DATABASE_URL": database_url}


def _platform(data_dir: Path, url: str):  # type: ignore[no-untyped-def]
    return platform_from_settings(Settings(data_dir=data_dir, database_url=url))


def _charge(data_dir: Path, url: str, rounds: tuple[int, ...]) -> None:
    with session_scope(_platform(data_dir, url).engine) as session:
        tenant = get_tenant(session=session, name="acme")
        for rnd in rounds:
            record_event(
                session,
                tenant_id=tenant.id,
                run_id="r1",
                round=rnd,
                params=DPParams(1.1, 0.05, 20, 1.0, 1e-5),
                spec_sha256="0" * 64,
            )


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDTEXT, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _export_heads(data_dir: Path) -> Path:
    out = data_dir / "ledger.jsonl"
    r = runner.invoke(app, ["audit", "export", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return data_dir / "ledger.jsonl.heads.json"


def _attack(url: str) -> str:
    """What a database writer without any key can do; returns the minted admin key."""
    engine = create_engine(url)  # a bare engine: no platform, no keys
    with engine.begin() as conn:
        tenant_id = conn.execute(text("SELECT id FROM tenant WHERE name = 'acme'")).scalar_one()
        # 1. Rewrite the charges after the kept head (entries 3 and 4) with a huge noise
        #    multiplier and re-hash the chain: entry 3 keeps its old signature, entry 4 none.
        with Session(conn) as session:  # the schema is no secret; the rows are read as such
            events = list(
                session.exec(
                    select(PrivacyEvent)
                    .where(PrivacyEvent.tenant_id == tenant_id)
                    .order_by(col(PrivacyEvent.seq))
                )
            )
            session.expunge_all()
        prev = events[1].entry_hash
        for ev in events[2:]:
            ev.noise_multiplier, ev.prev_hash = 1000.0, prev
            ev.entry_hash = prev = entry_digest(ev)
            conn.execute(
                text(
                    "UPDATE privacy_event SET noise_multiplier = 1000.0, prev_hash = :p, "
                    "entry_hash = :h, signature = :s WHERE id = :id"
                ),
                {
                    "p": ev.prev_hash,
                    "h": ev.entry_hash,
                    "s": ev.signature if ev.seq == 3 else None,
                    "id": ev.id,
                },
            )
        # 2. Append a correctly hashed budget raise to 100 (any actor text).
        last = conn.execute(
            text(
                "SELECT seq, entry_hash FROM privacy_budget_change WHERE tenant_id = :t "
                "ORDER BY seq DESC LIMIT 1"
            ),
            {"t": tenant_id},
        ).one()
        raise_ = BudgetChange(
            tenant_id=tenant_id,
            dataset="*",
            seq=last.seq + 1,
            created_at=datetime.now(UTC).replace(microsecond=0),
            actor="admin key 0123456789ab",
            old_epsilon=8.0,
            new_epsilon=100.0,
            delta=1e-5,
            reason="renewal",
            prev_hash=last.entry_hash,
            entry_hash="",
        )
        raise_.entry_hash = entry_digest(raise_)
        fields = [*BudgetChange.HASHED, "entry_hash"]
        conn.execute(
            text(
                f"INSERT INTO privacy_budget_change ({', '.join(fields)}) "
                f"VALUES ({', '.join(':' + f for f in fields)})"
            ),
            {f: getattr(raise_, f) for f in fields},
        )
        conn.execute(text("UPDATE tenant SET budget_epsilon = 100 WHERE id = :t"), {"t": tenant_id})
        conn.execute(
            text(
                "UPDATE privacy_ledger_head SET budget_seq = :s, budget_hash = :h "
                "WHERE tenant_id = :t"
            ),
            {"s": raise_.seq, "h": raise_.entry_hash, "t": tenant_id},
        )
        conn.execute(text("DELETE FROM privacy_signed_head"))
        # 3. Mint an admin key row (keys are stored as plain SHA-256).
        minted = "ftk_feedfacecafe_" + "x" * 43
        conn.execute(
            text(
                "INSERT INTO api_key (id, tenant_id, name, prefix, key_hash, scopes, created_at) "
                "VALUES ('minted', :t, '', 'feedfacecafe', :h, 'admin', :c)"
            ),
            {"t": tenant_id, "h": hashlib.sha256(minted.encode()).hexdigest(), "c": datetime.now()},
        )
    engine.dispose()
    return minted


def test_a_database_only_attacker_is_named_by_verify_with_and_without_head(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    heads = _export_heads(tmp_path)  # the auditor keeps this head (2 charges)
    admin = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--scopes", "admin",
                                "--secret-only"]).output.strip()  # fmt: skip
    _charge(tmp_path, database_url, rounds=(3, 4))  # charged after the kept head
    assert runner.invoke(app, ["audit", "verify", "--head", str(heads)]).exit_code == 0
    minted = _attack(database_url)

    for args in (["audit", "verify"], ["audit", "verify", "--head", str(heads)]):
        r = _cli(env, *args)
        assert r.returncode == 1, r.stdout + r.stderr
        out = " ".join((r.stdout + r.stderr).split())
        assert "budget change 2 (*: 8 -> 100 by 'admin key 0123456789ab'): unsigned" in out
        assert "ledger entry 3 (run r1, round 3, noise 1000)" in out
        assert "signature does not verify" in out
        assert "ledger entry 4 (run r1, round 4, noise 1000): unsigned" in out
        assert "API key feedfacecafe (scopes admin, id minted): unsigned" in out
        assert "ledger entry 2 " not in out  # the untouched entries are not blamed
        assert "OK:" not in out

    # The API refuses the minted key (its row carries no valid signature); the real one works.
    from serving.app import create_app

    platform = _platform(tmp_path, database_url)
    with TestClient(create_app(platform)) as client:
        bad = client.get("/v1/privacy/budget", headers={"Authorization": f"Bearer {minted}"})
        assert bad.status_code == 401
        good = client.get("/v1/privacy/budget", headers={"Authorization": f"Bearer {admin}"})
        assert good.status_code == 200, good.text
        report = client.get("/v1/privacy/report", headers={"Authorization": f"Bearer {admin}"})
        assert report.status_code == 200 and report.json()["chain_ok"] is False
        assert any("budget change 2 (to 100" in p for p in report.json()["chain"]["head_problems"])
        keys = client.get("/v1/privacy/signing-keys", headers={"Authorization": f"Bearer {admin}"})
        assert keys.status_code == 200
        assert keys.json()["keys"][0]["kind"] == "signing"


def test_after_rotate_kek_verify_passes_and_old_heads_still_verify(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    heads = _export_heads(tmp_path)
    platform = _platform(tmp_path, database_url)
    # A head signed as before v0006, with the key derived from KEK version 1.
    legacy_seed = platform.keyring.platform_key(LEGACY_HEAD_PURPOSE.removeprefix("fedtext:"))[1]
    with session_scope(platform.engine) as session:
        tenant = get_tenant(session=session, name="acme")
        old = sign_and_store(
            session,
            HeadSigner(legacy_seed),
            tenant_id=tenant.id,
            budget_epsilon=tenant.budget_epsilon,
            budget_delta=tenant.budget_delta,
        )
    kept = tmp_path / "kept.heads.json"  # the exported head and the pre-v0006 one
    kept.write_text(heads_file([*read_heads(heads.read_text()), old]))
    pinned = tmp_path / "keys.json"
    assert runner.invoke(app, ["audit", "keys", "--out", str(pinned)]).exit_code == 0

    rotated = runner.invoke(app, ["keys", "rotate-kek", "--grace", "0"])
    assert rotated.exit_code == 0 and "KEK version 2 is current" in rotated.output
    assert "retired: 1" in rotated.output  # KEK version 1 (and its derived keys) is gone
    _charge(tmp_path, database_url, rounds=(3,))  # signed after the rotation

    r = _cli(env, "audit", "verify", "--head", str(kept), "--keys", str(pinned))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept head(s) consistent" in r.stdout


def test_a_rotated_signing_key_is_followed_from_the_pinned_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    pinned = tmp_path / "keys.json"
    assert runner.invoke(app, ["audit", "keys", "--out", str(pinned)]).exit_code == 0
    rotated = runner.invoke(app, ["keys", "rotate-signing"])
    assert rotated.exit_code == 0 and "Signing key version 2 is current" in rotated.output
    # Rows signed by version 2 are accepted by an auditor who pinned version 1 only ...
    assert (
        runner.invoke(
            app, ["tenant", "budget", "acme", "--epsilon", "9", "--reason", "renewal"]
        ).exit_code
        == 0
    )
    r = runner.invoke(app, ["audit", "verify", "--keys", str(pinned)])
    assert r.exit_code == 0, r.output
    # ... but not by one who pinned another platform's keys.
    other = json.loads(pinned.read_text())
    other["keys"] = other["keys"][:1]
    other["keys"][0]["public_key"] = "A" * 43 + "="
    other["keys"][0]["key_id"] = hashlib.sha256(b"\0" * 32).hexdigest()[:32]
    pinned.write_text(json.dumps(other))
    r = runner.invoke(app, ["audit", "verify", "--keys", str(pinned)])
    assert r.exit_code == 1 and "not in the trusted signing history" in r.output


def _node_key(folder: Path) -> tuple[Path, str]:
    """A node public key file as `fedtext federation credentials` writes it; its fingerprint."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from privacy.node_proof import fingerprint, openssh_text

    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.pub").write_text(openssh_text(key))
    return folder / "node.pub", fingerprint(key)


def _enroll(tenant: str, public: Path) -> None:
    done = runner.invoke(app, ["federation", "enroll", "--tenant", tenant, str(public)])
    assert done.exit_code == 0, done.output


def test_a_node_key_enrolled_or_moved_by_plain_sql_is_named_by_verify(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    """Enrolling a key for globex, or moving acme's key to globex, around the platform."""
    assert runner.invoke(app, ["tenant", "create", "globex"]).exit_code == 0
    kept, kept_fp = _node_key(tmp_path / "acme1")
    moved, moved_fp = _node_key(tmp_path / "acme2")
    stranger, stranger_fp = _node_key(tmp_path / "stranger")
    _enroll("acme", kept)
    _enroll("acme", moved)
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
    engine = create_engine(database_url)  # a bare engine: no platform, no keys
    with engine.begin() as conn:
        globex = conn.execute(text("SELECT id FROM tenant WHERE name = 'globex'")).scalar_one()
        conn.execute(
            text(
                "INSERT INTO node_key (fingerprint, tenant_id, public_key, enrolled_by, "
                "created_at) VALUES (:f, :t, :k, 'operator', :c)"
            ),
            {"f": stranger_fp, "t": globex, "k": stranger.read_text(), "c": datetime.now(UTC)},
        )
        conn.execute(
            text("UPDATE node_key SET tenant_id = :t WHERE fingerprint = :f"),
            {"t": globex, "f": moved_fp},
        )
    engine.dispose()

    r = _cli(env, "audit", "verify")
    assert r.returncode == 1, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert f"tenant {globex} node key {stranger_fp} (enrolled by 'operator'): unsigned" in out
    assert (
        f"tenant {globex} node key {moved_fp} (enrolled by 'operator'): its signature does "
        "not verify" in out
    )
    assert kept_fp not in out  # acme's untouched enrollment is not blamed
    # sign-existing does not sign over the moved row: that is tampering, not age.
    refused = runner.invoke(app, ["audit", "sign-existing"])
    assert refused.exit_code == 1 and f"node key {moved_fp}" in refused.output
    assert "Nothing was signed" in refused.output


def test_rows_from_before_signatures_are_named_then_signed_once(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    public, fp = _node_key(tmp_path / "node")
    _enroll("acme", public)
    engine = create_engine(database_url)
    with engine.begin() as conn:  # as a database upgraded to v0006 (and v0007) holds them
        for table in ("privacy_event", "privacy_budget_change", "api_key", "node_key"):
            conn.execute(text(f"UPDATE {table} SET signature = NULL"))
    engine.dispose()
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "ledger entry 2 (run r1, round 2" in r.output
    assert "unsigned" in r.output and f"node key {fp}" in " ".join(r.output.split())
    dry = runner.invoke(app, ["audit", "sign-existing", "--dry-run"])
    assert dry.exit_code == 0 and "Would sign 2 ledger" in dry.output
    assert f"Node key {fp} enrolled for tenant" in " ".join(dry.output.split())
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 1
    done = runner.invoke(app, ["audit", "sign-existing"])
    assert done.exit_code == 0, done.output
    assert (
        "Signed 2 ledger entr(ies), 1 budget change(s), 1 API key(s), 1 node key "
        "enrollment(s)" in " ".join(done.output.split())
    )
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 0, r.output


def test_an_exported_entry_is_checked_offline_with_the_pinned_keys(
    env: dict[str, str], tmp_path: Path
) -> None:
    """docs/AUDIT.md's offline check: the export and the pinned keys, no platform code."""
    import base64

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pinned = tmp_path / "keys.json"
    assert runner.invoke(app, ["audit", "keys", "--out", str(pinned)]).exit_code == 0
    _export_heads(tmp_path)
    keys = {k["key_id"]: k["public_key"] for k in json.loads(pinned.read_text())["keys"]}
    rows = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        kid, _, sig = row["signature"].partition(":")
        message = (
            f"fedtext-signed-row/1\nprivacy_event\n{row['tenant_id']}\n{row['seq']}\n"
            f"{row['entry_hash']}"
        )
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(keys[kid]))
        public.verify(base64.b64decode(sig), message.encode())
        with pytest.raises(InvalidSignature):  # another entry's hash: refused
            moved = message.replace(f"\n{row['seq']}\n", f"\n{row['seq'] + 1}\n")
            public.verify(base64.b64decode(sig), moved.encode())
