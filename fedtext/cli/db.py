"""`fedtext db ...`: the platform's database schema."""

from __future__ import annotations

from fedtext.cli.console import console, group, open_platform, settings

db_app = group("Database schema.")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the platform's tables, or bring them to the newest migration."""
    config = settings()
    before = _revision(config.resolved_database_url)
    open_platform(config)
    after = _revision(config.resolved_database_url)
    where = config.resolved_database_url
    if before is None:
        console.print(f"Created the schema (revision {after}) at {where}")
    elif before != after:
        console.print(f"Upgraded the schema from revision {before} to {after} at {where}")
        if _before(before, 6):
            # Rows written before v0006 carry no signature: API keys and node enrollments
            # among them authenticate nothing until the operator vouches for them once.
            console.print(
                "Rows written before signed authorship (revision 0006) are unsigned: their API "
                "keys and node key enrollments are refused until you check the chains and sign "
                "them once with `fedtext audit sign-existing` (see docs/AUDIT.md, Authorship)."
            )
        if _before(before, 10):
            console.print(
                "Consents, tenant policies and model versions written before revision 0010 are "
                "unsigned: they are not acted on (no consent; the strictest policy; the model is "
                "not served) until `fedtext audit sign-existing` signs them (and writes the "
                "default policy of each tenant that has none)."
            )
    else:
        console.print(f"Schema is up to date (revision {after}) at {where}")


def _before(revision: str, signed_from: int) -> bool:
    """Whether a database at ``revision`` predates the migration that signed a row kind."""
    return revision == "unversioned" or (revision.isdigit() and int(revision) < signed_from)


def _revision(url: str) -> str | None:
    """The database's Alembic revision; None for a database without our tables."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    from tenancy.db import get_engine

    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            if "tenant" not in inspect(conn).get_table_names():
                return None
            return MigrationContext.configure(conn).get_current_revision() or "unversioned"
    finally:
        engine.dispose()
