"""`fedtext audit canary`: an empirical lower bound on epsilon next to the accounted one.

A small simulated federation trains in a scratch platform (its own SQLite database
and key file) with canary sentences in one tenant's data: each of ``m`` canaries is a
member with probability 1/2, decided by a seed. The tenant's released model then
scores every canary (minus its loss), and the one-run audit of Steinke, Nasr and
Jagielski (2023) turns the guesses into a lower bound on epsilon (privacy/canary.py).
A lower bound above the accounted epsilon means the DP implementation or its
accounting is broken.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlmodel import Session
from torch import nn

from clients.data import LabeledData
from clients.train import encode
from models import ModelSpec, build_model, load_weights
from orchestration.simulation import SimulationConfig, simulate
from privacy.accounting import compose_epsilon
from privacy.canary import AuditOutcome, audit_scores, make_canaries
from privacy.canary import canary_rows as rows_of_canary
from privacy.ledger import tenant_events
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import deployed_version, read_model_weights
from tenancy.tenants import create_tenant


class CanarySimulationConfig(SimulationConfig):
    """A simulation whose clients insert the member canaries of ``canary_seed``."""

    canary_count: int = 0
    canary_seed: int = 0
    canary_tenant: str = ""
    canary_rows: int = 1

    def client_overrides(self) -> dict[str, Any]:
        return {
            **super().client_overrides(),
            "canary-count": self.canary_count,
            "canary-seed": self.canary_seed,
            "canary-tenant": self.canary_tenant,
            "canary-rows": self.canary_rows,
        }


@dataclass(frozen=True)
class CanaryReport:
    run_id: str
    tenant: str
    seed: int
    outcome: AuditOutcome
    accounted_epsilon: float  # PRV over every release of the canary tenant in this run
    accounted_epsilon_rdp: float
    delta: float
    member_mean_loss: float
    nonmember_mean_loss: float
    seconds: float
    privacy_unit: str = "example"
    rows_per_user: int = 1  # privacy-unit user: rows of each canary user, and the bound k

    @property
    def lower_bound(self) -> float:
        return self.outcome.epsilon_lower_bound

    @property
    def passed(self) -> bool:
        """False when the empirical lower bound exceeds the accounted epsilon: a bug."""
        return self.lower_bound <= self.accounted_epsilon


def canary_losses(
    model: nn.Module, spec: ModelSpec, texts: list[str], labels: list[int]
) -> list[float]:
    """Cross-entropy of each canary under its own label."""
    data = LabeledData(tuple(texts), tuple(labels), tuple(spec.labels))
    *inputs, y = encode(data, spec).tensors
    model.eval()
    with torch.no_grad():
        logits = model(*inputs)
        return [float(v) for v in nn.functional.cross_entropy(logits, y, reduction="none")]


def _released_model(platform: Platform, tenant_id: str, name: str) -> tuple[nn.Module, ModelSpec]:
    with Session(platform.engine) as session:
        row = deployed_version(session=session, tenant_id=tenant_id, name=name)
        if row is None:
            raise RuntimeError(f"The canary run released no model {name!r} for the canary tenant.")
        spec = ModelSpec.from_json(row.spec_json)
        weights = read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row
        )
    return load_weights(build_model(spec), weights), spec


def _user_files(folder: Path, names: list[str], rows: int, per_user: int) -> dict[str, str]:
    """Each tenant's iid share of the demo corpus (``rows`` rows) as a CSV whose user
    column groups them into synthetic users of ``per_user`` rows."""
    import csv

    from clients.data import load_demo_corpus, partition

    corpus = load_demo_corpus()
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in zip(names, partition(corpus, "iid", len(names), 0), strict=True):
        path = folder / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["text", "label", "user"])
            for j, i in enumerate(idx[:rows]):
                label = corpus.label_names[corpus.labels[i]]
                out.writerow([corpus.texts[i], label, f"{name}-u{j // per_user}"])
        files[name] = str(path)
    return files


def run_canary_audit(
    *,
    open_platform: Callable[[Path], Platform],
    data_dir: Path | None = None,
    tenants: int = 2,
    rounds: int = 2,
    epsilon: float = 4.0,
    canaries: int = 64,
    max_train_examples: int = 128,
    max_test_examples: int = 32,
    batch_size: int = 32,
    learning_rate: float = 0.01,
    personalize_epochs: int = 1,
    guesses: int | None = None,
    confidence: float = 0.95,
    seed: int | None = None,
    delta: float = 1e-5,
    secure_mode: bool = True,
    privacy_unit: str = "example",
    canary_rows: int = 4,
) -> CanaryReport:
    """Train with canaries in a scratch platform and bound epsilon from below.

    Parameters
    ----------
    open_platform
        Builds a migrated platform (SQLite, key file) under a directory; the CLI passes
        ``fedtext.bootstrap.scratch_platform`` (orchestration does not read settings).
    data_dir
        Where the scratch platform lives (reset first); a temporary directory,
        removed afterwards, when None.
    canaries
        Number of canaries ``m``; about half become members of the first tenant's data.
    guesses
        How many canaries the attack guesses on (half each way); default ``m // 2``.
    seed
        Canary seed; a fresh random one when None (membership must be unpredictable).
    privacy_unit
        "user": the tenants' demo rows are grouped into synthetic users of
        ``canary_rows`` rows (written as files with a user column), the run is
        privacy-unit user with k = ``canary_rows``, and each canary is a *user* of
        ``canary_rows`` rows; a canary's score is minus the mean loss of its rows. The
        lower bound then checks the user-level claim.
    """
    import time

    if tenants < 2:
        raise ValueError("A canary federation needs at least two tenants.")
    if canaries < 2:
        raise ValueError("Use at least two canaries.")
    if not 0 < confidence < 1:
        raise ValueError("The confidence should be in (0, 1).")
    if privacy_unit not in ("example", "user"):
        raise ValueError(f"privacy_unit should be example or user, not {privacy_unit!r}.")
    if canary_rows < 1:
        raise ValueError("Each canary user needs at least one row.")
    if guesses is not None and not 2 <= guesses <= canaries:
        raise ValueError("--guesses should be between 2 and the number of canaries.")
    seed = secrets.randbits(31) if seed is None else seed
    scratch = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="fedtext-canary-")) if data_dir is None else data_dir
    if not scratch and root.exists():
        shutil.rmtree(root)
    started = time.monotonic()
    try:
        platform = open_platform(root)
        names = [f"canary-{i}" for i in range(1, tenants + 1)]
        ids: dict[str, str] = {}
        with session_scope(platform.engine) as session:
            for name in names:
                row = create_tenant(
                    session=session,
                    keyring=platform.keyring,
                    name=name,
                    budget_epsilon=epsilon + 1.0,  # the gate must not be what stops the audit
                    budget_delta=delta,
                )
                ids[name] = row.id
        target = names[0]
        per_user = canary_rows if privacy_unit == "user" else 1
        files = (
            _user_files(root / "user-data", names, max_train_examples + max_test_examples, per_user)
            if privacy_unit == "user"
            else {}
        )
        result = simulate(
            platform,
            CanarySimulationConfig(
                privacy_unit=privacy_unit,
                max_examples_per_user=per_user,
                data_files=files,
                canary_rows=per_user,
                tenants=tuple(names),
                rounds=rounds,
                epsilon=epsilon,
                batch_size=batch_size,
                learning_rate=learning_rate,
                personalize_epochs=personalize_epochs,
                max_train_examples=max_train_examples,
                max_test_examples=max_test_examples,
                min_nodes=tenants,
                secure_mode=secure_mode,
                canary_count=canaries,
                canary_seed=seed,
                canary_tenant=target,
            ),
        )
        with Session(platform.engine) as session:
            charged = [
                e.params() for e in tenant_events(session, ids[target]) if e.run_id == result.run_id
            ]
        if not charged:
            raise RuntimeError("The canary tenant was never charged: it did not train.")
        model, spec = _released_model(
            platform, ids[target], str(result.summary["tenants"][target]["model"])
        )
        cans = make_canaries(seed, canaries, len(spec.labels))
        texts = [t for c in cans for t in rows_of_canary(c, per_user)]
        labels = [c.label for c in cans for _ in range(per_user)]
        row_losses = canary_losses(model, spec, texts, labels)
        # One score per canary (per canary user: the mean over its rows).
        losses = [
            sum(row_losses[i * per_user : (i + 1) * per_user]) / per_user for i in range(len(cans))
        ]
        members = [c.member for c in cans]
        outcome = audit_scores(
            [-loss for loss in losses],
            members,
            delta=delta,
            guesses=guesses,
            confidence=confidence,
        )
        member_losses = [x for x, m in zip(losses, members, strict=True) if m]
        other_losses = [x for x, m in zip(losses, members, strict=True) if not m]
        return CanaryReport(
            run_id=result.run_id,
            tenant=target,
            seed=seed,
            outcome=outcome,
            accounted_epsilon=compose_epsilon(charged, delta),
            accounted_epsilon_rdp=compose_epsilon(charged, delta, "rdp"),
            delta=delta,
            member_mean_loss=sum(member_losses) / max(len(member_losses), 1),
            nonmember_mean_loss=sum(other_losses) / max(len(other_losses), 1),
            seconds=time.monotonic() - started,
            privacy_unit=privacy_unit,
            rows_per_user=per_user,
        )
    finally:
        if scratch:
            shutil.rmtree(root, ignore_errors=True)
