"""The audit report as a self-contained HTML page: the page is a Jinja2 template
(templates/report.html.j2), the epsilon curve an inline SVG drawn here."""

from __future__ import annotations

import html
from typing import Literal

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from privacy.ledger import TENANT_WIDE
from privacy.schemas import AuditReport, RoundRow
from privacy.units import unit_label


def _escape(value: object) -> Markup:
    # Every {{ value }} is escaped as html.escape does (&#x27; for '), so pages are the bytes
    # they were before the template; Markup (tables, the SVG) passes as it is.
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


_ENV = Environment(
    loader=PackageLoader("privacy", "templates"),
    autoescape=True,
    finalize=_escape,
    keep_trailing_newline=True,
    undefined=StrictUndefined,
)


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


def _round_label(row: RoundRow) -> str:
    """A round as a reader names it: the final phase's releases are not extra rounds."""
    if row.purpose == "personalize":
        return "personalization"
    if row.purpose == "evaluate":
        return "final evaluation"
    return str(row.round)


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
    summary = (
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
    datasets = (
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
    runs = (
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
    rounds = (
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
        4,
    )
    changes = (
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
        4,
    )
    chain = (
        ["chain", "entries", "result", "head hash (keep it)"],
        [
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
        ],
    )
    return _ENV.get_template("report.html.j2").render(
        r=r,
        c=c,
        ind=r.independent,
        svg=Markup(epsilon_svg(r)),
        summary=summary,
        chain=chain,
        datasets=datasets,
        runs=runs,
        rounds=rounds,
        changes=changes,
    )


ReportFormat = Literal["json", "html"]


def render(report: AuditReport, fmt: ReportFormat) -> str:
    """The report as JSON (every field) or HTML."""
    if fmt == "json":
        return report.model_dump_json(indent=2)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"Unknown report format {fmt!r}; known: json, html.")
