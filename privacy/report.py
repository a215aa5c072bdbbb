"""The audit report of one tenant: budget, spend per run and round, chain check, methodology.

The model and its builder; :mod:`privacy.report_html` renders it.

Every epsilon here is recomposed from the raw ledger entries at report time (nothing
stored is trusted): PRV (Opacus) is the figure of record, RDP (Opacus) an upper-bound
cross-check, and PLD (Google's dp-accounting) an independent recomputation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version

from sqlmodel import Session

from privacy.accounting import DEFAULT_ACCOUNTANT, accountant_version, merge_history
from privacy.accounting import compose_epsilon as _compose
from privacy.budget import dataset_budgets
from privacy.heads import (
    PlatformKeys,
    authorship_problems,
    last_signed_head,
    platform_key_ids,
    platform_signer,
    sign_and_store,
    verify_head,
)
from privacy.independent import cross_check
from privacy.ledger import (
    GENESIS,
    TENANT_WIDE,
    PrivacyEvent,
    budget_changes,
    tenant_events,
    verify_chain,
)
from privacy.methodology import methodology
from privacy.params import DPParams
from privacy.schemas import (  # the report's shapes (import-light, for the SDK)
    AuditReport,
    BudgetChangeRow,
    ChainCheck,
    DatasetRow,
    IndependentCheck,
    RoundRow,
    RunRow,
    SignedHeadPublic,
)
from privacy.units import unit_label

# Beyond this many entries the curve is composed at run ends and evenly spaced points
# only: each PRV composition costs a fraction of a second.
MAX_CURVE_POINTS = 60
CROSS_CHECK_ACCOUNTANT = "rdp"


def _curve_points(events: Sequence[PrivacyEvent]) -> set[int]:
    """Indices at which the cumulative curve is composed."""
    n = len(events)
    if n <= MAX_CURVE_POINTS:
        return set(range(n))
    ends = {i for i in range(n) if i == n - 1 or events[i + 1].run_id != events[i].run_id}
    step = max(1, n // (MAX_CURVE_POINTS // 2))
    return ends | set(range(0, n, step)) | {n - 1}


def _units_of_runs(events: Sequence[PrivacyEvent]) -> dict[str, str]:
    """Each run's unit label (both, joined, if its entries differ)."""
    labels: dict[str, list[str]] = {}
    for ev in events:
        label = unit_label(ev.privacy_unit, ev.applied_json)
        if label not in labels.setdefault(ev.run_id, []):
            labels[ev.run_id].append(label)
    return {run: ", ".join(names) for run, names in labels.items()}


def build_report(
    session: Session,
    *,
    tenant_id: str,
    tenant_name: str,
    budget_epsilon: float,
    delta: float,
    last_head: SignedHeadPublic | None = None,
    trusted_keys: Sequence[str] | None = None,
) -> AuditReport:
    """Recompose every figure of one tenant from its ledger and budget chain.

    Parameters
    ----------
    session
        An open database session.
    tenant_id, tenant_name
        Whose report it is.
    budget_epsilon, delta
        The tenant's budget in force (kept on the tenant row).
    last_head, trusted_keys
        The newest head signed earlier, checked against the chains now (truncation,
        rewrite, budget edits), and the key ids it may be signed with.
    """
    events = tenant_events(session, tenant_id)
    changes = budget_changes(session, tenant_id)
    params = [e.params() for e in events]
    cache: dict[tuple[object, ...], float] = {}

    def compose_epsilon(items: Sequence[DPParams], delta: float, acc: str = "prv") -> float:
        # A run, a dataset and a prefix often hold the same releases: compose each once.
        key = (tuple(merge_history(items)), delta, acc)
        if key not in cache:
            cache[key] = _compose(items, delta, acc)
        return cache[key]

    spent = compose_epsilon(params, delta)
    spent_rdp = compose_epsilon(params, delta, CROSS_CHECK_ACCOUNTANT)

    points = _curve_points(events)
    rows = []
    for i, ev in enumerate(events):
        prefix = params[: i + 1]
        at = i in points
        rows.append(
            RoundRow(
                **{f: getattr(ev, f) for f in RoundRow.model_fields if hasattr(ev, f)},
                cumulative_epsilon=compose_epsilon(prefix, delta) if at else None,
                cumulative_epsilon_rdp=(
                    compose_epsilon(prefix, delta, CROSS_CHECK_ACCOUNTANT) if at else None
                ),
            )
        )

    runs: dict[str, list[PrivacyEvent]] = {}
    for ev in events:
        runs.setdefault(ev.run_id, []).append(ev)
    run_rows = []
    for run_id, evs in runs.items():
        run_params = [e.params() for e in evs]
        run_rows.append(
            RunRow(
                run_id=run_id,
                datasets=sorted({e.dataset for e in evs}),
                rounds=len(evs),
                first_at=evs[0].created_at,
                last_at=evs[-1].created_at,
                epsilon=compose_epsilon(run_params, delta),
                epsilon_rdp=compose_epsilon(run_params, delta, CROSS_CHECK_ACCOUNTANT),
            )
        )

    own = dataset_budgets(session, tenant_id)
    dataset_rows = []
    for name in sorted({e.dataset for e in events} | set(own)):
        ds_params = [e.params() for e in events if e.dataset == name]
        ds_spent = compose_epsilon(ds_params, delta)
        budget = own.get(name)
        dataset_rows.append(
            DatasetRow(
                dataset=name,
                events=len(ds_params),
                budget_epsilon=budget,
                spent_epsilon=ds_spent,
                spent_epsilon_rdp=compose_epsilon(ds_params, delta, CROSS_CHECK_ACCOUNTANT),
                remaining_epsilon=None if budget is None else max(0.0, budget - ds_spent),
            )
        )

    ledger_problem = verify_chain(events)
    budget_problem = verify_chain(changes)
    tenant_wide = [c for c in changes if c.dataset == TENANT_WIDE]
    chain = ChainCheck(
        ledger_ok=ledger_problem is None,
        ledger_entries=len(events),
        ledger_problem=(
            None
            if ledger_problem is None
            else f"entry {ledger_problem.seq}: {ledger_problem.reason}"
        ),
        ledger_head=events[-1].entry_hash if events else GENESIS,
        budget_chain_ok=budget_problem is None,
        budget_changes=len(changes),
        budget_problem=(
            None
            if budget_problem is None
            else f"change {budget_problem.seq}: {budget_problem.reason}"
        ),
        budget_head=changes[-1].entry_hash if changes else GENESIS,
        budget_matches_tenant=(
            not tenant_wide or math.isclose(tenant_wide[-1].new_epsilon, budget_epsilon)
        ),
        checked_head_at=last_head.head.signed_at if last_head else None,
        head_problems=(
            verify_head(
                last_head,
                events=events,
                changes=changes,
                budget_epsilon=budget_epsilon,
                budget_delta=delta,
                trusted_keys=trusted_keys,
            )
            if last_head
            else []
        ),
    )
    agreement = cross_check(params, delta, spent)
    return AuditReport(
        tenant=tenant_name,
        tenant_id=tenant_id,
        generated_at=datetime.now(UTC).replace(microsecond=0),
        fedtext_version=version("fedtext"),
        accountant=DEFAULT_ACCOUNTANT,
        accountant_version=accountant_version(),
        cross_check_accountant=CROSS_CHECK_ACCOUNTANT,
        budget_epsilon=budget_epsilon,
        delta=delta,
        spent_epsilon=spent,
        spent_epsilon_rdp=spent_rdp,
        remaining_epsilon=max(0.0, budget_epsilon - spent),
        events=len(events),
        datasets=dataset_rows,
        runs=run_rows,
        rounds=rows,
        budget_changes=[
            BudgetChangeRow(**{f: getattr(c, f) for f in BudgetChangeRow.model_fields})
            for c in changes
        ],
        chain=chain,
        chain_ok=chain.ok,
        independent=IndependentCheck(
            library=agreement.library,
            method=agreement.method,
            epsilon=agreement.independent,
            of_record=agreement.of_record,
            abs_diff=agreement.abs_diff,
            agrees=agreement.agrees,
        ),
        methodology=methodology(
            delta, sorted({e.privacy_unit for e in events}), _units_of_runs(events)
        ),
    )


def signed_report(
    session: Session,
    keys: PlatformKeys,
    key_versions: Sequence[int],
    *,
    tenant_id: str,
    tenant_name: str,
    budget_epsilon: float,
    delta: float,
) -> AuditReport:
    """The report, checked against the last signed head, with a new signed head (kept in
    the database too; the caller commits)."""
    report = build_report(
        session,
        tenant_id=tenant_id,
        tenant_name=tenant_name,
        budget_epsilon=budget_epsilon,
        delta=delta,
        last_head=last_signed_head(session, tenant_id),
        trusted_keys=platform_key_ids(keys, key_versions),
    )
    # Authorship (docs/AUDIT.md): rows without an accepted signature break the chain check.
    report.chain.head_problems += authorship_problems(
        keys, tenant_events(session, tenant_id), budget_changes(session, tenant_id)
    )
    report.chain_ok = report.chain.ok
    report.signed_head = sign_and_store(
        session,
        platform_signer(keys),
        tenant_id=tenant_id,
        budget_epsilon=budget_epsilon,
        budget_delta=delta,
    )
    return report
