"""The audit report of one tenant: budget, spend per run and round, chain check, methodology.

Every epsilon here is recomposed from the raw ledger entries at report time (nothing
stored is trusted): PRV (Opacus) is the figure of record, RDP (Opacus) an upper-bound
cross-check, and PLD (Google's dp-accounting) an independent recomputation.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Literal

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
    PRIVACY_UNIT,
    TENANT_WIDE,
    PrivacyEvent,
    budget_changes,
    tenant_events,
    verify_chain,
)
from privacy.params import DPParams
from privacy.schemas import (  # the report's shapes (import-light, for the SDK); re-exported
    AuditReport,
    BudgetChangeRow,
    ChainCheck,
    DatasetRow,
    IndependentCheck,
    MethodologyItem,
    RoundRow,
    RunRow,
    SignedHeadPublic,
)
from sdk.units import unit_label

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


def _unit_answer(units: Sequence[str], run_units: dict[str, str] | None = None) -> str:
    example = (
        "One training example (one text with its label) of one tenant's dataset "
        f"(privacy unit '{PRIVACY_UNIT}'). A person who contributed k examples is "
        "protected only by group privacy, which degrades roughly as k times epsilon; "
        "the unit is not a person and not a whole tenant."
    )
    user = (
        "One user (privacy unit 'user'): every row that carries one value of the tenant's "
        "user column. Each user keeps at most k rows (max_examples_per_user in each entry's "
        "applied settings), is Poisson-sampled as a whole, and its rows' mean gradient is "
        "clipped as one contribution; the held-out evaluation counts are released at "
        "sensitivity k. The guarantee holds for a person only if the user column names "
        "people (docs/AUDIT.md)."
    )
    # Which run protected what (k included): the JSON and the HTML both carry this answer.
    per_run = ""
    if run_units and "user" in units:
        per_run = (
            " Runs and their unit: "
            + "; ".join(f"{run}: {label}" for run, label in run_units.items())
            + "."
        )
    if set(units) == {"user"}:
        return user + per_run
    if "user" in units:
        return (
            "Entries name their unit (column 'unit'): on 'example' entries, " + example
            + " On 'user' entries, " + user + " The composed total mixes both units: it is a "
            "per-user figure only where every entry is a 'user' entry." + per_run
        )  # fmt: skip
    return example


def methodology(
    delta: float, units: Sequence[str] = (), run_units: dict[str, str] | None = None
) -> list[MethodologyItem]:
    """Answers to the questions of NIST SP 800-226 for how fedtext trains and accounts.

    ``units``: the privacy units of the tenant's entries (none: example); ``run_units``:
    each run's unit label with its k (``unit_label``)."""
    qa = [
        ("What is the unit of privacy?", _unit_answer(units, run_units)),
        (
            "What is the neighbouring relation?",
            "Add-or-remove one example (unbounded DP), the relation under which Opacus "
            "analyses Poisson-subsampled DP-SGD and under which dp-accounting's PLD "
            "accountant is run (NeighboringRelation.ADD_OR_REMOVE_ONE).",
        ),
        (
            "Which variant of DP, with which epsilon and delta?",
            f"Approximate (epsilon, delta)-DP with delta fixed at {delta:g} for this tenant; "
            "every epsilon in this report is at that delta. A run is refused when delta is "
            "not below 1/n for the tenant's n training examples.",
        ),
        (
            "Which mechanism is accounted?",
            "DP-SGD (Opacus): Poisson sampling at rate q, per-example gradient clipping to "
            "norm C, Gaussian noise of standard deviation sigma*C per step. Each ledger "
            "entry is one federated round, or the tenant's personalization after the last "
            "round (a DP fine-tune of the global model on its own data, charged like a "
            "round but not a round): 'steps' such steps with the recorded sigma and q.",
        ),
        (
            "How are releases composed?",
            "Sequentially over every entry of the tenant, across runs and datasets, without "
            "assuming datasets are disjoint. The figure of record is Opacus's PRV "
            "accountant; RDP (Opacus) is shown as an upper-bound cross-check, and the total "
            "is recomputed independently with the PLD accountant of Google's dp-accounting. "
            "A dataset's own budget is checked against the composition of that dataset's "
            "entries only; the tenant budget against all of them.",
        ),
        (
            "When is a release charged?",
            "When a round is dispatched, before any message leaves the coordinator: a "
            "round that fails afterwards, or a reply that is rejected, stays charged "
            "(over-counting, never under-counting). A round that would pass the tenant's "
            "or the dataset's budget is not dispatched. Each check and its charge run in "
            "one transaction holding the tenant's ledger head, and a run reserves its "
            "planned releases before round 1: every decision counts other active runs' "
            "reservations as spent, so concurrent runs cannot overspend one budget.",
        ),
        (
            "What is protected?",
            "The model updates each client sends (DP-SGD is applied on the tenant's own "
            "machine, so the coordinator only ever sees noised updates) and everything "
            "computed from them: the global model and every stored model version, as "
            "post-processing. Evaluation metrics leave a node only as confusion counts "
            "with Gaussian noise (sensitivity 1 per matrix), charged as ledger entries of "
            "purpose 'evaluate' (sample rate 1, one step per matrix); accuracy and "
            "macro-F1 in run summaries and model versions are computed from those, each "
            "with its standard deviation and 95% interval under the known noise and the "
            "test split's size (privacy/uncertainty.py). A personalized model replaces "
            "the global one, and if-better deploys a version, only when the released "
            "difference is significant (one-sided, 5% error rate); otherwise the version "
            "records why not.",
        ),
        (
            "What is NOT covered by this guarantee?",
            "The number of training examples of each tenant, which its node states for "
            "planning (the sample rate q = 1/ceil(n/B) reveals it to within a batch "
            "anyway); which tenants took part and when; error codes of failed nodes (codes "
            "only, never text). No training metric leaves a node and the test count is "
            "released only as the noised total of the confusion counts. Hyperparameter "
            "search done outside the platform is not accounted. Client-level DP, when a "
            "run enables it, is accounted by Flower's own accountant and is not part of "
            "this ledger.",
        ),
        (
            "What trust is placed in whom?",
            "Each tenant's client node is trusted to run DP-SGD with the parameters it "
            "was sent; it reports the parameters it applied and a mismatch is rejected. "
            "The coordinator is trusted to write the ledger; the hash chains make an "
            "edit, deletion or reordering of entries detectable. Each report and ledger "
            "export comes with a head signed with Ed25519 under a key derived from the "
            "platform's key-encryption key (not in the database): against a head kept "
            "outside the database, a deleted tail, a tenant's chain deleted, a budget "
            "edited outside the record or a chain rewritten and re-hashed is detected "
            "(the command fedtext audit verify --head FILE). Keep the heads.",
        ),
        (
            "Implementation caveats?",
            "In secure mode Opacus would draw from torchcsprng, which has no build for "
            "current torch; fedtext then draws DP-SGD noise and Poisson sampling from "
            "torch generators seeded with 63 bits of OS entropy per release (not "
            "cryptographically secure generators), and noise as Opacus's secure mode "
            "does (four draws summed and halved, its defence against floating-point "
            "attacks). With secure mode off (tests) the generators are seeded the same "
            "way but noise is a single draw. Evaluation noise comes from the OS CSPRNG "
            "(random.SystemRandom), in floating point.",
        ),
        (
            "Is there an empirical check?",
            "The command fedtext audit canary trains a small federation with canary "
            "sentences in "
            "one tenant's data and derives a statistical lower bound on epsilon from a "
            "membership-inference test (one-run auditing, Steinke, Nasr and Jagielski "
            "2023). It can reveal a broken implementation; it cannot prove the upper "
            "bound, and on small federations the bound is far below the accounted epsilon.",
        ),
    ]
    return [MethodologyItem(question=q, answer=a) for q, a in qa]


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


# --- HTML -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#222}
.wide{max-width:100%;overflow-x:auto;margin:.5rem 0 1.5rem}
table{border-collapse:collapse;margin:0}
h2,p,dd,figure{overflow-wrap:anywhere}figure svg{max-width:100%;height:auto}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right;font-size:.85rem}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.ok{color:#0a0;font-weight:bold}.bad{color:#c00;font-weight:bold}
code{font-size:.8rem;word-break:break-all}dt{font-weight:bold;margin-top:.6rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def epsilon_svg(report: AuditReport, width: int = 720, height: int = 300) -> str:
    """Cumulative epsilon (PRV solid, RDP dashed) after each ledger entry, budget dashed red."""
    pts = [
        (r.seq, r.cumulative_epsilon, r.cumulative_epsilon_rdp)
        for r in report.rounds
        if r.cumulative_epsilon is not None
    ]
    left, right, top, bottom = 56, 16, 24, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(report.rounds), 1)
    y_max = max([report.budget_epsilon, *[p[1] or 0 for p in pts], *[p[2] or 0 for p in pts]])
    y_max = (y_max or 1.0) * 1.1

    def x(seq: float) -> float:
        return left + plot_w * (seq / n)

    def y(eps: float) -> float:
        return top + plot_h * (1 - eps / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="cumulative epsilon over time">',
        f"<title>Cumulative epsilon of tenant {_e(report.tenant)} "
        f"at delta {report.delta:g}</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#999"/>',
    ]
    for k in range(5):
        val = y_max * k / 4
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(val):.1f}" y2="{y(val):.1f}" '
            f'stroke="#e4e4e4"/><text x="{left - 6}" y="{y(val) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{val:.2f}</text>'
        )
    if pts:
        prv_style = 'stroke="#1f5fbf" stroke-width="2"'
        rdp_style = 'stroke="#888" stroke-width="1.5" stroke-dasharray="5 3"'
        for key, style in ((1, prv_style), (2, rdp_style)):
            path = f"M {x(0):.1f} {y(0):.1f}"
            for p in pts:
                path += f" L {x(p[0]):.1f} {y(p[key] or 0):.1f}"
            parts.append(f'<path d="{path}" fill="none" {style}/>')
        for p in pts:
            parts.append(
                f'<circle class="point" cx="{x(p[0]):.1f}" cy="{y(p[1] or 0):.1f}" r="3" '
                f'fill="#1f5fbf"><title>entry {p[0]}: epsilon {p[1]:.3f}</title></circle>'
            )
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y(report.budget_epsilon):.1f}" '
        f'y2="{y(report.budget_epsilon):.1f}" stroke="#c00" stroke-dasharray="6 4"/>'
        f'<text x="{left + plot_w - 4}" y="{y(report.budget_epsilon) - 5:.1f}" font-size="11" '
        f'fill="#c00" text-anchor="end">budget {report.budget_epsilon:g}</text>'
    )
    if report.rounds:
        first, last = report.rounds[0].created_at, report.rounds[-1].created_at
        parts.append(
            f'<text x="{left}" y="{height - 26}" font-size="11">{_e(first.isoformat())}</text>'
            f'<text x="{left + plot_w}" y="{height - 26}" font-size="11" text-anchor="end">'
            f"{_e(last.isoformat())}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" font-size="12" text-anchor="middle">'
        "ledger entry (time order): PRV solid, RDP dashed</text>"
        f'<text x="14" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">epsilon</text></svg>'
    )
    return "".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    # Wrapped: a wide table scrolls inside the page instead of widening it.
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="wide">{table}</div>'


def _round_label(row: RoundRow) -> str:
    """A round as a reader names it: the final phase's releases are not extra rounds."""
    if row.purpose == "personalize":
        return "personalization"
    if row.purpose == "evaluate":
        return "final evaluation"
    return str(row.round)


def _verdict(ok: bool, good: str = "OK", bad: str = "FAILED") -> str:
    return f'<span class="ok">{good}</span>' if ok else f'<span class="bad">{bad}</span>'


def _report_unit(r: AuditReport) -> str:
    """The summary's unit line; k per run is in the methodology's unit answer."""
    units = {w.privacy_unit for w in r.rounds}
    if not units:
        return "per example (nothing charged yet)"
    if units == {"user"}:
        return "per user (k per run: see Methodology)"
    if "user" in units:
        return "mixed: per user on 'user' entries, per example on the others"
    return "per example"


def render_html(report: AuditReport) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched)."""
    r = report
    c = r.chain
    summary = _table(
        ["figure", "value"],
        [
            ["budget epsilon", f"{r.budget_epsilon:g}"],
            ["delta", f"{r.delta:g}"],
            [f"spent epsilon ({r.accountant}, of record)", _f(r.spent_epsilon, 4)],
            [
                f"spent epsilon ({r.cross_check_accountant}, upper-bound cross-check)",
                _f(r.spent_epsilon_rdp, 4),
            ],
            [f"spent epsilon ({r.independent.library}, PLD)", _f(r.independent.epsilon, 4)],
            ["remaining epsilon", _f(r.remaining_epsilon, 4)],
            ["ledger entries", r.events],
            ["privacy unit (what one epsilon protects)", _report_unit(r)],
        ],
    )
    datasets = _table(
        ["dataset", "entries", "own budget", "spent (PRV)", "spent (RDP)", "remaining"],
        [
            [
                d.dataset,
                d.events,
                _f(d.budget_epsilon),
                _f(d.spent_epsilon, 4),
                _f(d.spent_epsilon_rdp, 4),
                _f(d.remaining_epsilon, 4),
            ]
            for d in r.datasets
        ],
    )
    run_unit: dict[str, set[str]] = {}
    for w in r.rounds:
        run_unit.setdefault(w.run_id, set()).add(w.privacy_unit)
    runs = _table(
        [
            "run",
            "datasets",
            "unit",
            "rounds",
            "first",
            "last",
            "run epsilon (PRV)",
            "run epsilon (RDP)",
        ],
        [
            [
                u.run_id,
                ", ".join(u.datasets),
                ", ".join(unit_label(x) for x in sorted(run_unit.get(u.run_id, ()))),
                u.rounds,
                u.first_at.isoformat(),
                u.last_at.isoformat(),
                _f(u.epsilon, 4),
                _f(u.epsilon_rdp, 4),
            ]
            for u in r.runs
        ],
    )
    rounds = _table(
        [
            "#",
            "run",
            "round or phase",
            "purpose",
            "dataset",
            "time (UTC)",
            "unit",
            "mechanism",
            "noise multiplier",
            "sample rate",
            "steps",
            "clip norm",
            "delta",
            "accountant",
            "cumulative epsilon (PRV)",
            "cumulative (RDP)",
        ],
        [
            [
                w.seq,
                w.run_id[:12],
                _round_label(w),
                w.purpose,
                w.dataset,
                w.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                w.privacy_unit,
                w.mechanism,
                f"{w.noise_multiplier:.6g}",
                f"{w.sample_rate:.6g}",
                w.steps,
                f"{w.clip_norm:g}",
                f"{w.delta:g}",
                f"{w.accountant} ({w.accountant_version})",
                _f(w.cumulative_epsilon, 4),
                _f(w.cumulative_epsilon_rdp, 4),
            ]
            for w in r.rounds
        ],
        left=4,
    )
    changes = _table(
        ["#", "scope", "time (UTC)", "actor", "old epsilon", "new epsilon", "delta", "reason"],
        [
            [
                b.seq,
                "tenant" if b.dataset == TENANT_WIDE else f"dataset {b.dataset}",
                b.created_at.isoformat(),
                b.actor,
                _f(b.old_epsilon),
                _f(b.new_epsilon),
                f"{b.delta:g}",
                b.reason,
            ]
            for b in r.budget_changes
        ],
        left=4,
    )
    chain_rows = [
        [
            "ledger chain",
            c.ledger_entries,
            "intact" if c.ledger_ok else c.ledger_problem,
            c.ledger_head,
        ],
        [
            "budget chain",
            c.budget_changes,
            "intact" if c.budget_chain_ok else c.budget_problem,
            c.budget_head,
        ],
    ]
    method = "".join(f"<dt>{_e(m.question)}</dt><dd>{_e(m.answer)}</dd>" for m in r.methodology)
    ind = r.independent
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>fedtext privacy audit report: {_e(r.tenant)}</title><style>{_CSS}</style></head>
<body>
<h1>Privacy audit report: tenant {_e(r.tenant)}</h1>
<p>Tenant id <code>{_e(r.tenant_id)}</code>. Generated {_e(r.generated_at.isoformat())} by
fedtext {_e(r.fedtext_version)}; accountant of record {_e(r.accountant)}
({_e(r.accountant_version)}). Every figure is recomposed from the raw ledger entries.</p>
<h2>Budget</h2>{summary}
<h2>Chain check: {_verdict(c.ok)}</h2>
{_table(["chain", "entries", "result", "head hash (keep it)"], chain_rows)}
<p>Budget in force matches the last recorded tenant-wide change:
{_verdict(c.budget_matches_tenant, "yes", "NO: the budget was changed outside the record")}.</p>
<p>Against the last signed head ({_e(c.checked_head_at or "none kept yet")}):
{_verdict(not c.head_problems, "consistent", "; ".join(c.head_problems))}.</p>
{_signed(r)}
<h2>Independent recomputation: {_verdict(ind.agrees, "agrees", "DISAGREES")}</h2>
<p>{_e(ind.library)}, {_e(ind.method)}: epsilon {ind.epsilon:.4f} against {ind.of_record:.4f}
of record (difference {ind.abs_diff:.4f}).</p>
<h2>Epsilon over time</h2>
<figure>{epsilon_svg(r)}<figcaption>Cumulative epsilon at delta {r.delta:g} after each
ledger entry; the dashed red line is the budget in force.</figcaption></figure>
<h2>Datasets</h2>{datasets}
<h2>Runs</h2>{runs}
<h2>Rounds (every ledger entry, all DP parameters)</h2>{rounds}
<h2>Budget changes</h2>{changes if r.budget_changes else "<p>None recorded.</p>"}
<h2>Methodology (after the questions of NIST SP 800-226)</h2><dl>{method}</dl>
</body></html>
"""


def _signed(r: AuditReport) -> str:
    if r.signed_head is None:
        return ""
    h = r.signed_head
    return (
        "<h3>Signed head (keep it)</h3><p>Ed25519 key <code>"
        f"{_e(h.key_id)}</code>, public key <code>{_e(h.public_key)}</code>, signature "
        f"<code>{_e(h.signature)}</code> over <code>{_e(h.head.model_dump_json())}</code>. "
        "Save the JSON report (or <code>GET /v1/privacy/head</code>) and check later "
        "exports with <code>fedtext audit verify --head FILE</code>.</p>"
    )


ReportFormat = Literal["json", "html"]


def render(report: AuditReport, fmt: ReportFormat) -> str:
    """The report as JSON (every field) or HTML."""
    if fmt == "json":
        return report.model_dump_json(indent=2)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"Unknown report format {fmt!r}; known: json, html.")


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
