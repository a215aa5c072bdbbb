"""A live table of a running federation: rounds done and each tenant's latest metrics.

The simulation runs in the calling thread (Ray and Flower want the main thread); a
daemon thread polls the database, which the ServerApp writes after every round.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlmodel import Session, col, select

from fedtext.format import num
from fedtext.log_file import library_output_to_log
from privacy.uncertainty import WIDE_ADVICE, wide_interval, z_value
from tenancy.platform import Platform
from tenancy.tables import RoundMetric, Tenant, TrainingRun

T = TypeVar("T")


def _render(platform: Platform, run_id: str, progress: Progress, task: TaskID) -> Group:
    with Session(platform.engine) as session:
        run = session.get(TrainingRun, run_id)
        metrics = session.exec(
            select(RoundMetric).where(RoundMetric.run_id == run_id).order_by(col(RoundMetric.id))
        ).all()
        names = {t.id: t.name for t in session.exec(select(Tenant)).all()}
    rounds = json.loads(run.config_json).get("rounds", 0) if run and run.config_json else 0
    # A node reports no training metric (only DP outputs leave it): a round is done when
    # its updates were accepted; evaluation is released once, after the last round.
    done = max((m.round for m in metrics if m.phase == "train"), default=0)
    progress.update(task, total=rounds or None, completed=min(done, rounds) if rounds else done)
    # Personalization is its own phase after the last round, never an extra round.
    personalize = bool(json.loads(run.config_json).get("personalize_epochs")) if run else False
    table = Table(
        "tenant", f"rounds (of {rounds})" if rounds else "rounds",
        *(["personalized"] if personalize else []),
        "accuracy g/p", "macro-F1 g/p",
        box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left",
        caption="g: the global model / p: personalized; test scores as released with DP "
        "noise (their 95% intervals: the results table)",
    )  # fmt: skip
    latest: dict[str, dict[str, RoundMetric]] = {}
    for m in metrics:
        latest.setdefault(m.tenant_id, {})[m.phase] = m
    for tenant_id, phases in sorted(latest.items(), key=lambda kv: names.get(kv[0], kv[0])):
        tr, ev, pe = phases.get("train"), phases.get("evaluate"), phases.get("personalize")
        table.add_row(
            names.get(tenant_id, tenant_id[:8]),
            str(tr.round) if tr else "0",
            *(["yes" if pe else ""] if personalize else []),
            _pair(ev.accuracy if ev else None, pe.accuracy if pe else None),
            _pair(ev.macro_f1 if ev else None, pe.macro_f1 if pe else None),
        )
    return Group(progress, table)


def _pair(first: float | None, second: float | None) -> str:
    if first is None and second is None:
        return ""
    return f"{num(first, '-')}/{num(second, '-')}"


def watch_run(platform: Platform, run_id: str, work: Callable[[], T], console: Console) -> T:
    """Run ``work`` while showing the run's progress; returns what ``work`` returns.

    Meanwhile the libraries' output (Flower, Ray's processes) goes to the log file.
    """
    progress = Progress(
        TextColumn(f"run {run_id[:8]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    task = progress.add_task("rounds", total=None)
    stop = threading.Event()
    # Libraries' output is sent to the log first, so that Live's own stdout proxy wraps
    # the terminal and not the log.
    with library_output_to_log(), Live(console=console, refresh_per_second=2) as live:

        def poll() -> None:
            while not stop.wait(1.0):
                try:
                    live.update(_render(platform, run_id, progress, task))
                except Exception:  # the DB may be mid-migration at start; try again
                    continue

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            return work()
        finally:
            stop.set()
            poller.join(timeout=5)
            live.update(_render(platform, run_id, progress, task))
            if not console.is_terminal:  # Live's last render ends without a line break
                live.stop()
                console.line()


def results_table(models: list[str], epsilon: str) -> Table:
    """The per-tenant results table of a finished run (demo and simulate); ``epsilon``
    says what its epsilon column holds. Rows: ``result_row``. Fits 80 columns."""
    table = Table(
        "tenant", "train", "test", "accuracy (95%)", "macro-F1 (95%)", "epsilon", "version",
        box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False,
        title_justify="left", caption_justify="left",
        title=f"Results, model {', '.join(models)} (full precision: the run's JSON summary)",
        # Only DP outputs leave a node: the test split's size and scores are computed
        # from the confusion counts it released with Gaussian noise (docs/AUDIT.md).
        caption="Scores and test rows as released with DP noise, with 95% intervals; "
        "version (g)/(p): it holds the global/personalized model (p only if "
        f"significantly better); epsilon: {epsilon}",
    )  # fmt: skip
    for column in table.columns:
        column.no_wrap = True
    return table


def interval(value: float | None, low: float | None, high: float | None) -> str:
    """``0.712 (0.63-0.79)``: a released figure and its 95% interval."""
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.2f}-{high:.2f})"


def result_row(name: str, t: Mapping[str, Any], epsilon: str) -> list[str]:
    """One tenant's row of ``results_table`` from its run summary entry."""
    test = num(t.get("test_examples"), "-")
    if t.get("test_examples") is not None and t.get("test_examples_sd") is not None:
        test += f"±{z_value() * t['test_examples_sd']:.0f}"
    return [
        name,
        num(t.get("train_examples")),
        test,
        interval(t.get("accuracy"), t.get("accuracy_low"), t.get("accuracy_high")),
        interval(t.get("macro_f1"), t.get("macro_f1_low"), t.get("macro_f1_high")),
        epsilon,
        f"v{t.get('version')} ({'p' if t.get('personalized') else 'g'})",
    ]


def result_notes(tenants: Mapping[str, Mapping[str, Any]], eval_noise: float | None) -> list[str]:
    """Lines under the results table: which intervals are too wide to mean anything and
    what to do about it (one advice for all tenants)."""
    wide = []
    for name, t in tenants.items():
        found = wide_interval(t)
        if found is not None:
            metric, width = found
            rows = t.get("test_examples")
            wide.append(f"{name} ({metric} {width:.2f} wide, {num(rows, '?')} test rows)")
    if not wide:
        return []
    advice = WIDE_ADVICE.format(now=f", now {eval_noise:g}" if eval_noise else "")
    return [
        "[yellow]Too wide to tell models apart:[/yellow] 95% intervals of "
        + ", ".join(wide)
        + f". {advice}"
    ]


def epsilon_notes(
    target: float | None, tenants: Mapping[str, Mapping[str, Any]], eval_noise: float | None
) -> list[str]:
    """What a run's epsilon means for a tenant, why it differs from the target and why
    runs compose to less than their sum: lines for the CLI after a run."""
    pairs = sorted(
        (float(t["run_epsilon"]), float(t.get("two_runs_epsilon") or 0))
        for t in tenants.values()
        if t.get("run_epsilon")
    )
    if not pairs:
        return []
    low, high = num(pairs[0][0]), num(pairs[-1][0])
    spent = low if low == high else f"{low}-{high}"
    text = (
        "[bold]Epsilon[/bold] bounds how much what leaves a tenant (updates, scores) can "
        "depend on any one of its examples; its budget caps the total over runs."
    )
    if target:
        text += (
            f" This run spent {spent} for a target of {num(target)}: training meets it from "
            "below" + (", the released scores' noise is charged on top." if eval_noise else ".")
        )
    one, two = pairs[0]
    if two:
        text += (
            f" Runs compose to less than their sum (PRV accounting): two like this cost "
            f"{num(two)}, not {num(2 * one)}."
        )
    return [text]
