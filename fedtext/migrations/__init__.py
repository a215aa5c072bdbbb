"""Alembic migrations of the platform database (tenancy and ledger tables).

Shipped inside the package so `fedtext db upgrade` works from an installed wheel.
"""
