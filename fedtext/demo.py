"""`fedtext demo`: three tenants, a DP federation, encrypted models, served predictions."""

from __future__ import annotations

import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from fedtext.plaintext_scan import find_plaintext_weights
from fedtext.platform import platform_from_settings, upgrade_schema
from fedtext.server_thread import BackgroundServer
from fedtext.settings import Settings
from models import DEFAULT_FAMILY, training_defaults
from runs.simulation import SimulationConfig, simulate
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
    console.print(f"[bold]Tenants[/bold] {', '.join(names)} created in {data_dir}")
    shown_rounds = rounds or training_defaults(model).rounds
    console.print(
        f"[bold]Federation[/bold] {len(names)} simulated nodes, model {model}, "
        f"{shown_rounds} rounds, target epsilon {epsilon} per tenant (Opacus DP-SGD), "
        f"{partitioning} partition, then a DP personalization ..."
    )
    started = time.monotonic()
    result = simulate(
        platform,
        SimulationConfig.parse(
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
        ),
    )
    seconds = time.monotonic() - started
    console.print(f"[bold]Federation[/bold] finished in {seconds:.0f} s (run {result.run_id})")

    app = create_app(platform, ServingConfig(operator_token=secrets.token_urlsafe(32)))
    reports: list[TenantReport] = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        console.print(f"[bold]API[/bold] serving on {server.url}")
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
    )


def print_report(report: DemoReport, console: Console) -> None:
    for t in report.tenants:
        table = Table(title=f"tenant {t.name}", title_justify="left", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        table.add_row("training examples", str(t.train_examples))
        # Only DP outputs leave a node: the test split's size and scores are computed
        # from the confusion counts it released with Gaussian noise (docs/AUDIT.md).
        table.add_row("test examples (DP-noised)", str(t.test_examples))
        table.add_row(
            "test accuracy (DP-noised): global / personal",
            f"{_fmt(t.global_accuracy)} / {_fmt(t.accuracy)}",
        )
        table.add_row(
            "test macro-F1 (DP-noised): global / personal",
            f"{_fmt(t.global_macro_f1)} / {_fmt(t.macro_f1)}",
        )
        table.add_row("epsilon spent / budget", f"{t.spent_epsilon:.2f} / {t.budget_epsilon:.2f}")
        table.add_row("model version", f"{t.model} v{t.version}")
        expected = dict(DEMO_EXAMPLES)
        for text, label, score in t.predictions:
            mark = "ok" if expected.get(text) == label else f"expected {expected.get(text)}"
            table.add_row(f"predict: {text}", f"{label} ({score:.2f}) {mark}")
        console.print(table)
    console.print(
        f"Weights at rest: {report.encrypted_blobs} AES-256-GCM blobs, "
        f"{len(report.plaintext_files)} plaintext weight files under {report.data_dir}."
    )
    console.print(
        f"A predict key asking for the privacy ledger: HTTP {report.predict_key_on_ledger_status}."
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
