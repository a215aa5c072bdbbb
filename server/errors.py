"""The coordinator's one domain error."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run cannot proceed; the message is for the operator."""
