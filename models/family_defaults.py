"""The model families by name, with their training defaults: what a run record needs to
know about a family without building one (no torch; the CLI's help and the SDK read it).

:mod:`models.spec` holds the registry that builds each family; a test checks both name
the same families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ENCODER_HEAD = "encoder-head"
# Every family, in the order a person should meet them: the default first.
FAMILIES = (ENCODER_HEAD, "lstm", "transformer", "minilm")
DEFAULT_FAMILY = ENCODER_HEAD

# Tokens per input when a run does not say. Sentence encoders pad each group only to its
# longest input, so a long limit costs nothing on short texts; the token families pad
# every input to the limit, so theirs stays near a tweet's length.
_DEFAULT_SEQ_LEN = {ENCODER_HEAD: 128}


@dataclasses.dataclass(frozen=True)
class TrainingDefaults:
    """A family's DP-SGD settings when a run leaves them out ("auto" or None).

    Chosen on the public demo corpus (docs/TRAINING.md), never on a tenant's data:
    tuning on private data would itself spend privacy.
    """

    rounds: int
    local_epochs: int
    learning_rate: float
    batch_size: int  # expected Poisson batch; 0: sized by each tenant's data (dp_batch_size)
    personalize_epochs: int

    def fill(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting (by field name): ``given``'s, or this default where it is None."""
        return {
            f.name: getattr(self, f.name) if given.get(f.name) is None else given[f.name]
            for f in dataclasses.fields(self)
        }


# A head's round costs milliseconds once the node's sentence vectors exist, so it gets many
# short rounds (each averages away some client drift) and a stronger local fine-tune; the
# token families' rounds cost minutes on a CPU.
_TRAINING_DEFAULTS = {
    ENCODER_HEAD: TrainingDefaults(
        rounds=20, local_epochs=1, learning_rate=0.05, batch_size=0, personalize_epochs=2
    ),
}
_TOKEN_DEFAULTS = TrainingDefaults(
    rounds=3, local_epochs=1, learning_rate=0.01, batch_size=128, personalize_epochs=1
)


def families() -> list[str]:
    return sorted(FAMILIES)


def training_defaults(family: str) -> TrainingDefaults:
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; known: {families()}.")
    return _TRAINING_DEFAULTS.get(family, _TOKEN_DEFAULTS)


def default_max_seq_len(family: str) -> int:
    return _DEFAULT_SEQ_LEN.get(family, 48)
