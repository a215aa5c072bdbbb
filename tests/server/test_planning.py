from __future__ import annotations

import pytest

from models import DEFAULT_FAMILY
from privacy.accounting import compose_epsilon
from privacy.params import DPParams
from runs.spec import RunSpec
from server.planning import PlanRefused, plan_tenant


def plan(**overrides):  # type: ignore[no-untyped-def]
    args = dict(
        tenant_id="t",
        tenant_name="acme",
        node_id=1,
        num_train=2000,
        num_test=500,
        target_epsilon=3.0,
        delta=1e-5,
        clip_norm=1.0,
        batch_size=64,
        local_epochs=1,
        rounds=3,
        budget_epsilon=10.0,
        spent_events=[],
    )
    args.update(overrides)
    return plan_tenant(**args)


def test_noise_is_planned_for_the_whole_run() -> None:
    p = plan()
    assert p.round_params.steps == 32 and p.round_params.sample_rate == 1 / 32
    total = compose_epsilon([p.round_params] * 3, 1e-5)
    assert 2.9 <= total <= 3.0
    assert p.run_epsilon == pytest.approx(total)


def test_a_tenant_over_budget_is_refused_before_anything_is_sent() -> None:
    past = [DPParams(0.8, 1 / 32, 96, 1.0, 1e-5)]
    with pytest.raises(
        PlanRefused, match=r"acme' refused: would exceed budget: budget epsilon 4\.000"
    ):
        plan(budget_epsilon=4.0, spent_events=past)


def test_delta_must_be_below_one_over_n() -> None:
    with pytest.raises(PlanRefused, match="not below 1/n"):
        plan(num_train=50, delta=0.05, batch_size=16)


def test_too_little_data_for_the_batch_is_refused() -> None:
    with pytest.raises(PlanRefused, match="50 training examples, fewer than the batch size 64"):
        plan(num_train=50)


def test_an_unreachable_privacy_target_is_refused() -> None:
    with pytest.raises(PlanRefused, match=r"needs noise multiplier .* raise epsilon"):
        plan(target_epsilon=0.01, rounds=50)


def test_personalization_is_planned_within_the_same_target() -> None:
    p = plan(personalize_epochs=1)
    assert p.personal_params is not None and p.personal_params.steps == 32
    total = compose_epsilon([p.round_params] * 3 + [p.personal_params], 1e-5)
    assert 2.9 <= total <= 3.0


def test_run_config_reads_kebab_keys_and_validates() -> None:
    cfg = RunSpec.from_run_config({"rounds": "4", "epsilon": 2, "secure-mode": "false"})
    assert cfg.rounds == 4 and cfg.epsilon == 2.0 and cfg.secure_mode is False
    assert cfg.model_name == cfg.model == DEFAULT_FAMILY and len(cfg.run_id) == 32
    assert cfg.eval_noise == 10.0  # evaluation is released with noise by default
    with pytest.raises(ValueError, match="target epsilon should be a positive"):
        RunSpec.from_run_config({"epsilon": 0})
    with pytest.raises(ValueError, match="eval-noise should be 0"):
        RunSpec.from_run_config({"eval-noise": 0.1})
    with pytest.raises(ValueError, match="Unknown model family 'cnn'"):
        RunSpec.from_run_config({"model": "cnn"})
    with pytest.raises(ValueError, match="Invalid run configuration"):
        RunSpec.from_run_config({"rounds": "many"})
