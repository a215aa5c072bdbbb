"""Alembic environment: runs on the connection ``fedtext.bootstrap.upgrade_schema`` passes."""

from __future__ import annotations

from alembic import context

from tenancy.migrations.schema import target_metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - fedtext always passes one
    raise RuntimeError("Run migrations through `fedtext db upgrade`.")
context.configure(
    connection=connection,
    target_metadata=target_metadata(),
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
