"""Tenants, API keys and scopes, DB tables, keyring (envelope encryption), encrypted blobs."""
