from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.layers import DPLSTM

from clients.evaluate import evaluate, macro_f1
from clients.train import ENGINES, train_dp
from models import build_model, model_state
from privacy.params import DPParams, poisson_schedule
from tests.factories import tiny_spec, toy_data


def plan(n: int, batch: int, epochs: int, sigma: float = 1.0) -> DPParams:
    rate, steps = poisson_schedule(n, batch, epochs)
    return DPParams(sigma, rate, steps, 1.0, 1e-3)


@pytest.mark.parametrize("engine", ENGINES)
def test_train_applies_exactly_the_requested_dp_parameters(engine: str) -> None:
    spec, data = tiny_spec(), toy_data(48)
    model = build_model(spec)
    before = {k: v.clone() for k, v in model_state(model).items()}
    dp = plan(len(data), 16, 2)
    result = train_dp(
        model,
        data,
        spec,
        dp,
        batch_size=16,
        epochs=2,
        learning_rate=0.1,
        secure_mode=False,
        engine=engine,
    )
    assert result.applied == dp
    assert result.examples == 48
    assert any(not torch.equal(before[k], v) for k, v in model_state(model).items())
    # No hooks left behind: the model is the plain module it was, DPLSTM included.
    assert not hasattr(model, "_module")
    assert isinstance(model.get_submodule("lstm"), DPLSTM)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_poisson_batches_still_take_accounted_noise_steps(engine: str) -> None:
    # 3 examples at batch 1: q = 1/3 and 12 steps, each empty with probability (2/3)^3;
    # with this seed several are (the Opacus path used to crash on them).
    spec, data = tiny_spec(), toy_data(3)
    dp = plan(len(data), 1, 4)
    model = build_model(spec)
    result = train_dp(
        model,
        data,
        spec,
        dp,
        batch_size=1,
        epochs=4,
        learning_rate=0.1,
        secure_mode=False,
        seed=3,
        engine=engine,
    )
    assert result.applied == dp
    assert all(torch.isfinite(v).all() for v in model_state(model).values())


def test_unknown_engine_is_refused() -> None:
    spec, data = tiny_spec(), toy_data(16)
    with pytest.raises(ValueError, match="Unknown DP engine 'jax'"):
        train_dp(
            build_model(spec),
            data,
            spec,
            plan(16, 8, 1),
            batch_size=8,
            epochs=1,
            learning_rate=0.1,
            engine="jax",
        )


def test_a_plan_that_does_not_fit_the_local_data_is_refused() -> None:
    spec, data = tiny_spec(), toy_data(48)
    wrong = plan(100, 16, 1)
    with pytest.raises(ValueError, match="DP plan does not fit the local data"):
        train_dp(build_model(spec), data, spec, wrong, batch_size=16, epochs=1, learning_rate=0.1)


def test_secure_mode_without_csprng_warns_loudly() -> None:
    spec, data = tiny_spec(), toy_data(16)
    dp = plan(len(data), 8, 1)
    with pytest.warns(RuntimeWarning, match="not a CSPRNG"):
        train_dp(
            build_model(spec),
            data,
            spec,
            dp,
            batch_size=8,
            epochs=1,
            learning_rate=0.1,
            secure_mode=True,
        )


def test_evaluate_reports_accuracy_and_macro_f1() -> None:
    spec, data = tiny_spec(), toy_data(30)
    result = evaluate(build_model(spec), data, spec)
    assert result.examples == 30
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.macro_f1 <= 1.0


def test_macro_f1_known_values() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    assert macro_f1(y_true, y_true, 3) == 1.0
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
