"""Alembic migrations of the platform database (tenancy's tables and the ledger's).

Shipped inside the package so `fedtext db upgrade` works from an installed wheel; run
through `fedtext.bootstrap.upgrade_schema`.
"""
