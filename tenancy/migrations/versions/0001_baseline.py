"""Baseline: tenants, API keys, data keys, model versions, runs, round metrics, ledger.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_budget_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("dataset", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("actor", sqltypes.AutoString(length=100), nullable=False),
        sa.Column("old_epsilon", sa.Float(), nullable=True),
        sa.Column("new_epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("reason", sqltypes.AutoString(length=500), nullable=False),
        sa.Column("prev_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("entry_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "seq"),
    )
    op.create_index(
        op.f("ix_privacy_budget_change_tenant_id"),
        "privacy_budget_change",
        ["tenant_id"],
        unique=False,
    )
    op.create_table(
        "privacy_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("dataset", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("run_id", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("privacy_unit", sqltypes.AutoString(), nullable=False),
        sa.Column("mechanism", sqltypes.AutoString(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("clip_norm", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("accountant", sqltypes.AutoString(), nullable=False),
        sa.Column("accountant_version", sqltypes.AutoString(), nullable=False),
        sa.Column("fedtext_version", sqltypes.AutoString(), nullable=False),
        sa.Column("spec_sha256", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("prev_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("entry_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "seq"),
    )
    op.create_index(op.f("ix_privacy_event_run_id"), "privacy_event", ["run_id"], unique=False)
    op.create_index(
        op.f("ix_privacy_event_tenant_id"), "privacy_event", ["tenant_id"], unique=False
    )
    op.create_table(
        "tenant",
        sa.Column("name", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("budget_epsilon", sa.Float(), nullable=False),
        sa.Column("budget_delta", sa.Float(), nullable=False),
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("deleted_at", sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_tenant_name"), "tenant", ["name"], unique=True)
    op.create_table(
        "training_run",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("status", sqltypes.AutoString(), nullable=False),
        sa.Column("config_json", sqltypes.AutoString(), nullable=False),
        sa.Column("summary_json", sqltypes.AutoString(), nullable=False),
        sa.Column("simulation_json", sqltypes.AutoString(), nullable=True),
        sa.Column("plans_json", sqltypes.AutoString(), nullable=False),
        sa.Column("checkpoint_round", sa.Integer(), nullable=False),
        sa.Column("checkpoint_blob", sqltypes.AutoString(), nullable=True),
        sa.Column("checkpoint_sha256", sqltypes.AutoString(), nullable=True),
        sa.Column("checkpoint_kek_version", sa.Integer(), nullable=True),
        sa.Column("error", sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("finished_at", sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "api_key",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(length=100), nullable=False),
        sa.Column("prefix", sqltypes.AutoString(length=32), nullable=False),
        sa.Column("key_hash", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("scopes", sqltypes.AutoString(length=100), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("expires_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_api_key_prefix"), "api_key", ["prefix"], unique=True)
    op.create_index(op.f("ix_api_key_tenant_id"), "api_key", ["tenant_id"], unique=False)
    op.create_table(
        "data_key",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_data_key_tenant_id"), "data_key", ["tenant_id"], unique=False)
    op.create_table(
        "model_version",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec_json", sqltypes.AutoString(), nullable=False),
        sa.Column("sha256", sqltypes.AutoString(length=64), nullable=False),
        sa.Column("blob_key", sqltypes.AutoString(length=255), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("run_id", sqltypes.AutoString(), nullable=True),
        sa.Column("metrics_json", sqltypes.AutoString(), nullable=False),
        sa.Column("deployed", sa.Boolean(), nullable=False),
        sa.Column("quantize", sqltypes.AutoString(length=32), nullable=True),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", "version"),
    )
    op.create_index(
        op.f("ix_model_version_tenant_id"), "model_version", ["tenant_id"], unique=False
    )
    op.create_table(
        "round_metric",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sqltypes.AutoString(), nullable=False),
        sa.Column("tenant_id", sqltypes.AutoString(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("phase", sqltypes.AutoString(), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.Column("macro_f1", sa.Float(), nullable=True),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_round_metric_run_id"), "round_metric", ["run_id"], unique=False)
    op.create_index(op.f("ix_round_metric_tenant_id"), "round_metric", ["tenant_id"], unique=False)


def downgrade() -> None:
    for table in (
        "round_metric", "model_version", "data_key", "api_key", "training_run", "tenant",
        "privacy_event", "privacy_budget_change",
    ):  # fmt: skip
        op.drop_table(table)
