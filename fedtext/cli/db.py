"""`fedtext db ...`: the platform's database schema."""

from __future__ import annotations

from fedtext.cli.console import console, group, open_platform, settings

db_app = group("Database schema.")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the platform's tables where they are missing."""
    config = settings()
    open_platform(config)
    console.print(f"Schema is up to date at {config.resolved_database_url}")
