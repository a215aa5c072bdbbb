"""What may cross the boundary between a tenant's node and the coordinator.

A node's replies carry DP outputs only: trained weights, the DP parameters applied,
DP-noised evaluation counts, and the count of training examples (stated in
docs/AUDIT.md: planning needs it, and the sample rate reveals it to within a batch).
A node that fails replies with one of these codes, never with exception text, which
can quote private data ("line 12 has unknown label 'X'"); the details stay in the
node's own log.
"""

from __future__ import annotations

CLIENT_ERRORS: dict[str, int] = {
    "internal": 100,  # anything unexpected; see the node's log
    "wrong-tenant": 101,  # the message was meant for another tenant's node
    "bad-request": 102,  # the message lacks a field or holds an invalid one
    "data-error": 103,  # the node's data could not be read or labelled
    "dp-plan-mismatch": 104,  # the DP plan does not fit the node's data
    "injected-fault": 105,  # a failure injected on purpose (tests, `inject-fault`)
    "no-evaluation-release": 106,  # asked to evaluate without DP parameters for it
    "encoder-mismatch": 107,  # the node's encoder files are not the ones the spec names
}
_BY_NUMBER = {number: name for name, number in CLIENT_ERRORS.items()}


# Flower's own codes (flwr.common.constant.ErrorCode), e.g. for a node that went away.
_FLOWER = {
    0: "flower-unknown",
    1: "flower-load-client-app",
    2: "flower-client-app-raised",
    3: "flower-message-unavailable",
    4: "flower-reply-unavailable",
    5: "flower-node-unavailable",
    6: "flower-mod-failed",
    7: "flower-invalid-fab",
    8: "flower-client-app-crashed",
}


def error_name(code: int, reason: str | None = None) -> str:
    """The name of a node's error code; ``reason`` is ignored on purpose.

    The coordinator records only this, so text a node (or Flower, which puts a
    traceback there) placed in ``reason`` is never stored or shown.
    """
    del reason
    number = int(code)
    return _BY_NUMBER.get(number) or _FLOWER.get(number) or f"unknown (code {number})"
