"""What one epsilon protects, as people read it (the report, the SDK and the console say
the same words)."""

from __future__ import annotations

import json


def unit_label(privacy_unit: str, applied_json: str = "{}") -> str:
    """ "per user (k = 8)" for a privacy-unit user entry (k: each user's row bound, from its
    applied settings), "per example" otherwise."""
    if privacy_unit != "user":
        return "per example"
    try:
        k = json.loads(applied_json or "{}").get("max_examples_per_user")
    except (ValueError, AttributeError):
        k = None
    return f"per user (k = {k})" if isinstance(k, int) else "per user"
