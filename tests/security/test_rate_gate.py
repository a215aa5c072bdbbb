"""The rate-limit rules that HTTP and gRPC share (serving.limits.RateGate), in process."""

from __future__ import annotations

from serving.limits import Limits, RateGate

ADDRESS = "10.0.0.7"


def _spend_failures(gate: RateGate, burst: int) -> None:
    for i in range(burst):
        admission = gate.admit(f"forged-{i}", ADDRESS)
        assert admission.refusal is None
        gate.answered(admission, 401, authenticated=False)


def test_with_the_per_key_limit_off_a_known_key_is_not_refused_for_its_address() -> None:
    # Before the review the gRPC adapter had its own copy of these rules, in which a key
    # that had authenticated fell through to its address's failure bucket when the per-key
    # limit was off: a neighbour guessing keys locked out a working client.
    gate = RateGate.from_limits(Limits(rate_per_second=None, failed_auth_per_second=1.0))
    first = gate.admit("real-key", ADDRESS)
    gate.answered(first, 200, authenticated=True)
    _spend_failures(gate, Limits().failed_auth_burst)
    assert gate.admit("unknown", ADDRESS).refusal is not None  # guessing is slowed
    assert gate.admit("real-key", ADDRESS).refusal is None  # the known key is not


def test_only_a_credential_that_authenticated_gets_a_bucket_of_its_own() -> None:
    gate = RateGate.from_limits(
        Limits(rate_per_second=1.0, burst=1, failed_auth_per_second=1.0, failed_auth_burst=1)
    )
    # A forged token answered 200 by a public route is not vouched for.
    forged = gate.admit("forged", ADDRESS)
    gate.answered(forged, 200, authenticated=False)
    assert not gate.admit("forged", ADDRESS).known
    key = gate.admit("real-key", ADDRESS)
    gate.answered(key, 200, authenticated=True)  # takes its bucket's one token
    again = gate.admit("real-key", ADDRESS)
    assert again.known and again.refusal is not None
    assert "per key" in again.refusal[0] and again.refusal[1] >= 1
    # A 401 (revoked since) forgets it and charges the address.
    gate.answered(again, 401, authenticated=False)
    assert not gate.admit("real-key", "10.0.0.8").known
    assert gate.admit("another", ADDRESS).refusal is not None
