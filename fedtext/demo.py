"""`fedtext demo`: three tenants, a DP federation, encrypted models, served predictions."""

from __future__ import annotations

import secrets
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.format import num
from fedtext.handoff import Handoff, console_url, curl_command, print_console, print_handoffs
from fedtext.log_file import current
from fedtext.plaintext_scan import find_plaintext_weights
from fedtext.progress import (
    epsilon_notes,
    result_notes,
    result_row,
    results_table,
    watch_run,
)
from fedtext.server_thread import BackgroundServer
from fedtext.settings import Settings
from models import DEFAULT_FAMILY, training_defaults
from orchestration.preflight import check_budgets
from orchestration.simulation import SimulationConfig, preflight, simulate
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.tenants import Scope, create_api_key, create_tenant

DEMO_TENANTS = ["acme", "globex", "initech"]
# Clear sentences none of the tenants trained on, with the label a reader would give them:
# airline and product topics, each sentiment twice.
DEMO_EXAMPLES: list[tuple[str, str]] = [
    ("My flight was delayed three hours and nobody told us anything.", "negative"),
    ("Thanks for the quick rebooking, the crew was wonderful!", "positive"),
    ("The app keeps crashing and support never answers.", "negative"),
    ("Absolutely love this phone, best purchase this year!", "positive"),
    ("Apple will announce the new iPad on Tuesday.", "neutral"),
    ("Google announced a new Android version today.", "neutral"),
]
DEMO_SENTENCES = [text for text, _ in DEMO_EXAMPLES]


class DemoRefused(ValueError):
    """The demo's settings do not fit (sizes or budget); nothing was trained or charged."""


@dataclass
class TenantReport:
    name: str
    train_examples: int
    test_examples: int
    accuracy: float | None
    macro_f1: float | None
    global_accuracy: float | None
    global_macro_f1: float | None
    spent_epsilon: float
    budget_epsilon: float
    version: int
    model: str = ""
    predictions: list[tuple[str, str, float]] = field(default_factory=list)
    predict_key: str = ""  # the demo's predict key of this tenant, shown once at the end
    admin_key: str = ""  # its admin key, for the web console; shown once at the end
    # The run summary's entry of this tenant: every released figure with its uncertainty.
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> int:
        """How many demo sentences got the label a reader would give them."""
        expected = dict(DEMO_EXAMPLES)
        return sum(expected.get(text) == label for text, label, _ in self.predictions)


@dataclass
class DemoReport:
    data_dir: Path
    run_id: str
    seconds: float
    tenants: list[TenantReport]
    predict_key_on_ledger_status: int
    encrypted_blobs: int
    plaintext_files: list[Path]
    target_epsilon: float | None = None
    eval_noise: float | None = None


def run_demo(
    data_dir: Path,
    *,
    tenants: list[str] | None = None,
    model: str = DEFAULT_FAMILY,
    rounds: int | None = None,
    epsilon: float = 4.0,
    max_train_examples: int = 3000,
    max_test_examples: int = 600,
    budget_epsilon: float = 8.0,
    secure_mode: bool = True,
    personalize_epochs: int | None = None,
    partitioning: str = "topic",
    batch_size: int | None = None,
    seed: int = 7,
    console: Console | None = None,
) -> DemoReport:
    """Run the whole path in ``data_dir`` (reset first: it is the demo's own directory).

    Settings left as None take the model family's defaults (models.training_defaults).
    """
    console = console or Console()
    names = tenants or DEMO_TENANTS
    if data_dir.exists():
        shutil.rmtree(data_dir)
    # The demo keeps its own SQLite database and key file inside its directory.
    settings = Settings(data_dir=data_dir, database_url=None, key_provider="file", kek_file=None)
    platform = platform_from_settings(settings)
    upgrade_schema(platform)
    keys: dict[str, dict[str, str]] = {}
    with session_scope(platform.engine) as session:
        for name in names:
            tenant = create_tenant(
                session=session, keyring=platform.keyring, name=name, budget_epsilon=budget_epsilon
            )
            _, admin = create_api_key(session=session, tenant=tenant, scopes=[Scope.admin])
            _, predict = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
            keys[name] = {"admin": admin, "predict": predict}
    console.print(
        f"[bold]Tenants[/bold] {', '.join(names)} created in {data_dir}, each with up to "
        f"{max_train_examples:,} training tweets ({partitioning} split of the demo corpus)"
    )
    config = SimulationConfig.parse(
        {
            "tenants": names,
            "model": model,
            "seed": seed,
            "rounds": rounds,
            "epsilon": epsilon,
            "max_train_examples": max_train_examples,
            "max_test_examples": max_test_examples,
            "secure_mode": secure_mode,
            "personalize_epochs": personalize_epochs,
            "partitioning": partitioning,
            "batch_size": batch_size,
        }
    )
    # Sizes and budgets are checked before Flower starts and before any progress bar.
    try:
        check_budgets(platform, config, preflight(config))
    except ValueError as exc:
        raise DemoRefused(str(exc)) from None
    shown_rounds = rounds or training_defaults(model).rounds
    console.print(
        f"[bold]Federation[/bold] {len(names)} simulated nodes, model {model}, "
        f"{shown_rounds} rounds, target epsilon {num(epsilon)} per tenant (DP-SGD), "
        "then each tenant's DP personalization. The first minute encodes each tenant's "
        "tweets once with the public MiniLM encoder."
    )
    started = time.monotonic()
    run_id = uuid.uuid4().hex
    result = watch_run(platform, run_id, lambda: simulate(platform, config, run_id), console)
    seconds = time.monotonic() - started
    console.print(f"[bold]Federation[/bold] finished in {seconds:.0f} s (run {result.run_id}).")

    app = create_app(platform, ServingConfig(operator_token=secrets.token_urlsafe(32)))
    reports: list[TenantReport] = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        console.print(f"[bold]API[/bold] started on {server.url} for the checks below.")
        for name in names:
            info: dict[str, Any] = result.summary["tenants"][name]
            auth = {"Authorization": f"Bearer {keys[name]['predict']}"}
            resp = http.post(
                f"/v1/models/{info['model']}/predict",
                json={"inputs": DEMO_SENTENCES, "top_k": 1},
                headers=auth,
            )
            resp.raise_for_status()
            body = resp.json()
            budget = http.get(
                "/v1/privacy/budget", headers={"Authorization": f"Bearer {keys[name]['admin']}"}
            ).json()
            reports.append(
                TenantReport(
                    name=name,
                    train_examples=info["train_examples"],
                    test_examples=info["test_examples"],
                    accuracy=info["accuracy"],
                    macro_f1=info["macro_f1"],
                    global_accuracy=info["global_accuracy"],
                    global_macro_f1=info["global_macro_f1"],
                    spent_epsilon=budget["spent_epsilon"],
                    budget_epsilon=budget["budget_epsilon"],
                    version=body["version"],
                    model=body["model"],
                    predict_key=keys[name]["predict"],
                    admin_key=keys[name]["admin"],
                    metrics={**info, "version": body["version"]},
                    predictions=[
                        (text, pred[0]["label"], pred[0]["score"])
                        for text, pred in zip(DEMO_SENTENCES, body["predictions"], strict=True)
                    ],
                )
            )
        # Scopes: a predict key may not read the tenant's privacy ledger.
        scope_check = http.get(
            "/v1/privacy/ledger", headers={"Authorization": f"Bearer {keys[names[0]]['predict']}"}
        ).status_code
    blobs = sorted(settings.blob_dir.rglob("*.ftx"))
    return DemoReport(
        data_dir=data_dir,
        run_id=result.run_id,
        seconds=seconds,
        tenants=reports,
        predict_key_on_ledger_status=scope_check,
        encrypted_blobs=len(blobs),
        plaintext_files=find_plaintext_weights(data_dir),
        target_epsilon=result.summary.get("target_epsilon"),
        eval_noise=result.summary.get("eval_noise"),
    )


def print_report(report: DemoReport, console: Console, *, serving_url: str | None = None) -> None:
    """The demo's results, predictions and checks, then what to paste next.

    ``serving_url``: the API is kept running there (``fedtext demo --serve``).
    """
    models = sorted({t.model for t in report.tenants})
    table = results_table(models, "spent/budget")
    for t in report.tenants:
        spent = f"{num(t.spent_epsilon)}/{num(t.budget_epsilon)}"
        table.add_row(*result_row(t.name, t.metrics, spent))
    console.print(table)
    released = {t.name: t.metrics for t in report.tenants}
    for line in result_notes(released, report.eval_noise):
        console.print(line)
    for line in epsilon_notes(report.target_epsilon, released, report.eval_noise):
        console.print(line)
    console.print(
        "[bold]Predictions[/bold] on sentences no tenant trained on (label, score; ok: the "
        "label a reader gives):"
    )
    expected = dict(DEMO_EXAMPLES)
    for i, text in enumerate(DEMO_SENTENCES):
        console.print(f"  {escape(text)} [dim](expected {expected[text]})[/dim]")
        cells = []
        for t in report.tenants:
            _, label, score = t.predictions[i]
            mark = "ok" if label == expected[text] else "WRONG"
            cells.append(f"{t.name} {label} {score:.2f} {mark}")
        console.print("      " + " | ".join(cells))
    console.print(
        f"[bold]Checks[/bold] weights at rest: {report.encrypted_blobs} AES-256-GCM blobs and "
        f"{len(report.plaintext_files)} plaintext weight files under {report.data_dir}; "
        f"a predict key asking for the privacy ledger gets HTTP "
        f"{report.predict_key_on_ledger_status} (only admin keys read it)."
    )
    items = [_handoff(t) for t in report.tenants]
    if serving_url is not None:
        print_served(console, items, serving_url)
        return
    print_handoffs(
        console, items, env={"FEDTEXT_DATA_DIR": str(report.data_dir.resolve())}, log_file=current()
    )
    console.print("Or keep the API up at the end of the demo: fedtext demo --serve")


def _handoff(t: TenantReport) -> Handoff:
    key, admin = t.predict_key, t.admin_key or None
    return Handoff(t.name, t.model, t.version, t.version, key, key[:16], admin_key=admin)


def print_served(console: Console, items: list[Handoff], url: str) -> None:
    """What to paste while ``fedtext demo --serve`` keeps the API running."""
    port = int(url.rsplit(":", 1)[1])
    console.print(
        f"[bold]API[/bold] running on {url} with the demo's tenants (Ctrl-C stops it). Try:"
    )
    for h in items:
        console.print(f"[bold]{h.tenant}[/bold] predict key (shown once): {h.key}")
        console.print(f"  {escape(curl_command(h.model, h.key or '', port=port))}")
    admins = {h.tenant: h.admin_key for h in items if h.admin_key}
    print_console(console, console_url(port=port), admins)
    log_file = current()
    if log_file is not None:
        console.print(f"Library logs: {log_file} (--verbose shows them here)")
