"""Every family: one DP round, spec round trip, public frozen parts never in the weights."""

from __future__ import annotations

import pytest
import torch

from clients.evaluate import evaluate
from clients.train import train_dp
from models import (
    ModelSpec,
    build_model,
    families,
    load_weights,
    model_state,
    save_weights,
    text_inputs,
)
from privacy.params import DPParams, poisson_schedule
from tests.factories import TINY_FAMILIES, tiny_family_spec, toy_data


def test_every_registered_family_has_a_tiny_test_config() -> None:
    assert (
        set(families())
        == set(TINY_FAMILIES)
        == {
            "encoder-head",
            "lstm",
            "transformer",
            "minilm",
        }
    )


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_family_trains_one_dp_round_and_round_trips(family: str) -> None:
    torch.manual_seed(0)
    spec = tiny_family_spec(family)
    model = build_model(spec)
    data = toy_data(32)
    rate, steps = poisson_schedule(len(data), 8, 1)
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    before = {k: v.clone() for k, v in model_state(model).items()}
    result = train_dp(
        model, data, spec, dp, batch_size=8, epochs=1, learning_rate=0.05, secure_mode=False
    )
    assert result.applied == dp
    after = model_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    rebuilt = load_weights(build_model(ModelSpec.from_json(spec.to_json())), save_weights(model))
    model.eval()
    rebuilt.eval()
    inputs = text_inputs(spec, ["a test sentence"])
    with torch.no_grad():
        assert torch.allclose(model(*inputs), rebuilt(*inputs))
    assert 0.0 <= evaluate(model, data, spec).accuracy <= 1.0


def test_minilm_keeps_public_layers_frozen_and_out_of_the_weights() -> None:
    model = build_model(tiny_family_spec("minilm"))
    state = model_state(model)
    assert not any(k.startswith("encoder.embeddings.") for k in state)
    assert not any(k.startswith("encoder.encoder.layer.0.") for k in state)
    assert any(k.startswith("encoder.encoder.layer.5.") for k in state)
    assert "head.weight" in state
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(not n.startswith(("head", "encoder.encoder.layer.5.")) for n in frozen)
    with pytest.raises(ValueError, match="trainable_layers should be between 0 and 6"):
        ModelSpec.create("minilm", ["a", "b"], trainable_layers=7)
