"""Pure accounting: epsilon of a sequence of DP events, and the noise for a target.

PRV (Opacus) is the figure of record; RDP is the cross-check. Both take the raw
(noise multiplier, sample rate, steps) history, never a stored epsilon.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, TypeVar

from privacy.params import DPParams

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

# Explicit registry (Opacus convention): unknown names raise ValueError. Opacus (and torch)
# load at the first composition, not with the ledger: `fedtext tenant ...` never composes.
_ACCOUNTANTS = ("prv", "rdp")
DEFAULT_ACCOUNTANT = "prv"


_R = TypeVar("_R")


def digest_lru(maxsize: int) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """``lru_cache`` for a pure function of long arguments (ledger histories), keyed by a
    16-byte digest of their repr instead of the arguments themselves.

    An lru_cache keyed by the history tuples held every history ever composed: 4,096 of
    50 entries are ~32 MB, and histories lengthen with every run (the soak's API process
    grew by hundreds of MB as runs were planned). The repr of floats, ints, strings and
    dataclasses is exact, so equal digests mean equal arguments (BLAKE2b, 128 bits).
    """

    def wrap(fn: Callable[..., _R]) -> Callable[..., _R]:
        found: OrderedDict[bytes, _R] = OrderedDict()
        lock = threading.Lock()

        @functools.wraps(fn)
        def cached(*args: Any) -> _R:
            key = hashlib.blake2b(repr(args).encode(), digest_size=16).digest()
            with lock:
                if key in found:
                    found.move_to_end(key)
                    return found[key]
            value = fn(*args)
            with lock:
                found[key] = value
                while len(found) > maxsize:
                    found.popitem(last=False)
            return value

        cached.cache_len = found.__len__  # type: ignore[attr-defined]
        return cached

    return wrap


def accountant_version() -> str:
    """The accountant library and its version, as recorded in each ledger entry."""
    return f"opacus-{version('opacus')}"


def create_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant by registry name; ``ValueError`` on an unknown name."""
    if name not in _ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {name!r}; known: {sorted(_ACCOUNTANTS)}.")
    from opacus.accountants import RDPAccountant
    from opacus.accountants.prv import PRVAccountant

    return PRVAccountant() if name == "prv" else RDPAccountant()


def merge_history(
    events: Iterable[DPParams] | Sequence[tuple[float, float, int]],
) -> list[tuple[float, float, int]]:
    """``(noise multiplier, sample rate, steps)`` with equal mechanisms merged, in first-seen order.

    Composition is commutative and k steps then m steps of one mechanism are k + m
    steps of it, so merging changes no epsilon; it keeps PRV fast (one PRV per
    distinct mechanism instead of one per round).
    """
    merged: dict[tuple[float, float], int] = {}
    for ev in events:
        if isinstance(ev, DPParams):
            key, steps = (ev.noise_multiplier, ev.sample_rate), ev.steps
        else:
            key, steps = (float(ev[0]), float(ev[1])), int(ev[2])
        merged[key] = merged.get(key, 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


def compose_epsilon(
    events: Iterable[DPParams] | Sequence[tuple[float, float, int]],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Cumulative epsilon at ``delta`` of the composition of ``events`` (0.0 for none).

    Parameters
    ----------
    events
        Releases as ``DPParams`` or ``(noise multiplier, sample rate, steps)``.
    delta
        The delta at which epsilon is reported.
    accountant
        ``"prv"`` (figure of record) or ``"rdp"`` (cross-check).
    """
    history = merge_history(events)
    if not history:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError("delta should be in (0, 1).")
    create_accountant(accountant)  # validate the name first
    return _epsilon(tuple(history), delta, accountant)


@digest_lru(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # Pure in its inputs, and tenants of one run share histories: the budget gate of a
    # 100-tenant round composes the same history 100 times.
    acc = create_accountant(accountant)
    acc.history = list(history)
    try:
        return float(acc.get_epsilon(delta=delta))
    except RuntimeError as exc:
        # Opacus's PRV discretisation fails on some histories (very high noise and sample
        # rate: "Discrete mean differs significantly from continuous mean."), which made
        # POST /v1/runs answer 500 (found by bench/soak.py). RDP bounds the same mechanism
        # from above, so the figure never under-counts; it is only looser.
        if accountant != "prv":
            raise
        log.warning("PRV accounting failed (%s); using the RDP bound", exc)
        return _epsilon(history, delta, "rdp")


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Smallest noise multiplier (to 1%) such that ``steps`` steps stay within the target."""
    if target_epsilon <= 0:
        raise ValueError("The target epsilon should be a positive value.")
    create_accountant(accountant)  # validate the name first
    return _noise(target_epsilon, delta, sample_rate, steps, accountant)


@lru_cache(maxsize=1024)
def _noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    # Pure; tenants with equal data sizes share a plan, and the search takes seconds.
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )
