"""Independent recomputation of cumulative epsilon with Google's ``dp-accounting``.

Opacus (PRV, RDP) keeps the figure of record; this module re-derives the same total
with a second library and a second method (privacy loss distributions), exactly as
the recipe in docs/AUDIT.md does, so that a report can show both side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version

import dp_accounting
from dp_accounting.pld import PLDAccountant

from privacy.accounting import merge_history
from privacy.params import DPParams

# The PLD discretization is pessimistic: a coarser grid can only raise epsilon.
PLD_DISCRETIZATION = 1e-4
# Opacus PRV and dp-accounting PLD are both tight estimates; they agree to about 1%.
AGREEMENT_REL_TOL = 0.02
AGREEMENT_ABS_TOL = 0.02


def library_version() -> str:
    """``dp-accounting-<version>`` as installed."""
    return f"dp-accounting-{version('dp-accounting')}"


def dp_event(history: Sequence[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    """The DP-SGD releases as one composed dp-accounting event (add/remove-one)."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
            for sigma, q, steps in history
        ]
    )


def pld_epsilon(
    events: Iterable[DPParams] | Sequence[tuple[float, float, int]], delta: float
) -> float:
    """Epsilon at ``delta`` from dp-accounting's PLD accountant (0.0 for no events).

    Parameters
    ----------
    events
        Releases as ``DPParams`` or ``(noise multiplier, sample rate, steps)``.
    delta
        The delta at which epsilon is reported; in (0, 1).
    """
    history = merge_history(events)
    if not history:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError("delta should be in (0, 1).")
    accountant = PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    accountant.compose(dp_event(history))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class Agreement:
    """How the figure of record compares with the independent recomputation."""

    of_record: float
    independent: float
    library: str
    method: str

    @property
    def abs_diff(self) -> float:
        return abs(self.of_record - self.independent)

    @property
    def agrees(self) -> bool:
        return self.abs_diff <= max(AGREEMENT_REL_TOL * self.of_record, AGREEMENT_ABS_TOL)


def cross_check(
    events: Sequence[DPParams] | Sequence[tuple[float, float, int]],
    delta: float,
    of_record: float,
) -> Agreement:
    """Recompute ``of_record`` with dp-accounting PLD and compare."""
    return Agreement(
        of_record=of_record,
        independent=pld_epsilon(events, delta),
        library=library_version(),
        method=(
            "privacy loss distribution (PLDAccountant, add-or-remove-one, "
            f"discretization {PLD_DISCRETIZATION:g})"
        ),
    )
