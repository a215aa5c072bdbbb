"""privacy-unit user (issue 29): data with a user column, user-level clipping, training
at the planned user sample rate, the plan and its accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from clients.data import (
    DataError,
    LabeledData,
    bound_users,
    load_labeled_file,
    train_test_split,
)
from clients.fastdp.clipper import FastClipper
from clients.train import train_dp_users, user_schedule
from models import ModelSpec, build_model, model_state
from privacy.accounting import compose_epsilon
from privacy.independent import pld_epsilon
from privacy.params import DPParams
from runs.spec import RunSpec
from server.planning import PlanRefused, plan_tenant
from tests.factories import toy_data

LABELS = ("negative", "neutral", "positive")


def with_users(data: LabeledData, sizes: list[int]) -> LabeledData:
    """``data``'s first sum(sizes) rows, user i writing sizes[i] of them."""
    users = tuple(f"u{i:03d}" for i, n in enumerate(sizes) for _ in range(n))
    head = data.head(len(users))
    return LabeledData(head.texts, head.labels, head.label_names, users)


def test_user_column_is_read_and_a_file_without_it_is_refused_clearly(tmp_path: Path) -> None:
    good = tmp_path / "t.csv"
    good.write_text("text,label,customer\nhello there,neutral,c1\nawful,negative,c2\n")
    data = load_labeled_file(good, LABELS, "customer")
    assert data.users == ("c1", "c2") and data.num_users() == 2
    assert load_labeled_file(good, LABELS).users is None
    with pytest.raises(DataError, match=r"missing column\(s\) user.*privacy-unit example"):
        load_labeled_file(good, LABELS, "user")
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": "hi", "label": "neutral", "user": " "}\n')
    with pytest.raises(DataError, match="line 1 has an empty 'user'"):
        load_labeled_file(empty, LABELS, "user")


def test_users_are_bounded_to_k_rows_and_split_whole() -> None:
    data = with_users(toy_data(60), [1, 2, 30, 5, 12, 10])
    bounded, left_out = bound_users(data, 4)
    assert left_out == (30 - 4) + (5 - 4) + (12 - 4) + (10 - 4)
    assert bounded.users is not None
    assert max(bounded.users.count(u) for u in set(bounded.users)) == 4
    assert bounded.num_users() == 6
    train, test = train_test_split(data, 0.3, seed=1)
    assert train.users is not None and test.users is not None
    assert not set(train.users) & set(test.users)  # a user is all train or all test
    with pytest.raises(DataError, match="user column"):
        bound_users(toy_data(5), 2)


def test_user_level_clipping_clips_each_users_mean_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    clip = 0.05
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for user in range(3):
        rows = (groups == user).nonzero().flatten()
        model.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()  # the user's mean
        grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))  # type: ignore[arg-type]
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert factor < 1.0  # every user is clipped: the bound is what is being tested
        expected = [e + factor * g for e, g in zip(expected, grads, strict=True)]
    with FastClipper(model, clip) as clipper:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        norms = clipper.backward(losses, groups)
    assert norms.shape == (3,)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)  # type: ignore[arg-type]
    # Each user's contribution is at most the clipping norm however many rows it has.
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))  # type: ignore[union-attr,arg-type]
    assert float(total) <= 3 * clip + 1e-6


def test_user_level_training_applies_the_user_plan_and_reports_the_bound() -> None:
    spec = ModelSpec.create("encoder-head", list(LABELS))
    data = with_users(toy_data(70), [1, 3, 20, 2, 6, 1, 9, 4, 2, 3, 1, 8, 5, 5])
    batch, rate, steps = user_schedule(data.num_users(), 4, 2)
    assert (batch, rate, steps) == (4, 0.25, 8)  # 14 users: ceil(14 / 4) = 4 batches
    dp = DPParams(1.0, rate, steps, 1.0, 1e-3)
    model = build_model(spec)
    before = {k: v.clone() for k, v in model_state(model).items()}
    result = train_dp_users(
        model, data, spec, dp, max_examples_per_user=5,
        batch_size=4, epochs=2, learning_rate=0.05, secure_mode=False,
    )  # fmt: skip
    assert result.applied == dp
    assert result.users == 14
    assert result.left_out == (20 - 5) + (6 - 5) + (9 - 5) + (8 - 5)
    assert result.examples == 70 - result.left_out
    assert any(not torch.equal(before[k], v) for k, v in model_state(model).items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="does not fit the local users"):
        train_dp_users(
            model, data, spec, DPParams(1.0, 0.5, steps, 1.0, 1e-3), max_examples_per_user=5,
            batch_size=4, epochs=2, learning_rate=0.05, secure_mode=False,
        )  # fmt: skip


def _user_plan(users: int, epsilon: float, **extra: object) -> object:
    args: dict[str, object] = {
        "tenant_id": "t", "tenant_name": "acme", "node_id": 1, "num_train": users,
        "num_test": 0, "target_epsilon": epsilon, "delta": 1e-5, "clip_norm": 1.0,
        "batch_size": 0, "local_epochs": 1, "rounds": 5, "budget_epsilon": 100.0,
        "spent_events": [], "privacy_unit": "user", "max_examples_per_user": 8,
    }  # fmt: skip
    args.update(extra)
    return plan_tenant(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("epsilon", [3.0, 8.0])
def test_user_level_epsilon_equals_an_independent_pld_computation(epsilon: float) -> None:
    plan = _user_plan(3000, epsilon, eval_noise=10.0, personalize_epochs=1)
    events = [r.params for r in plan.releases()]  # type: ignore[attr-defined]
    # q = expected users per step / users: 300 of 3,000 (dp_batch_size's n / 10).
    assert events[0].sample_rate == pytest.approx(0.1)
    # The evaluation: one user moves up to k = 8 counts, so sensitivity 8 (noise 10 / 8).
    assert events[-1].clip_norm == 8.0 and events[-1].noise_multiplier == pytest.approx(1.25)
    ours = compose_epsilon(events, 1e-5)
    independent = pld_epsilon(events, 1e-5)
    assert ours == pytest.approx(independent, rel=0.01)
    # Never under the independent figure beyond the PLD grid's own pessimism (1e-4).
    assert ours >= independent * (1 - 1e-3)


def test_too_few_users_is_refused_before_round_1_with_what_would_fit() -> None:
    with pytest.raises(PlanRefused, match=r"has 80 users: epsilon 0.2 .* fits epsilon") as e:
        _user_plan(80, 0.2, delta=1e-3, rounds=20)
    fits = float(str(e.value).split("fits epsilon ")[1].split()[0])
    assert 0.2 < fits < 1.0
    _user_plan(80, fits, delta=1e-3, rounds=20)  # what the refusal says fits, fits


def test_runspec_privacy_unit_user_settings() -> None:
    spec = RunSpec.parse({"privacy_unit": "User", "max_examples_per_user": 4})
    assert (spec.privacy_unit, spec.user_column, spec.max_examples_per_user) == ("user", "user", 4)
    with pytest.raises(ValueError, match="encoder-head family only"):
        RunSpec.parse({"privacy_unit": "user", "model": "lstm"})
    with pytest.raises(ValueError, match="Unknown privacy unit 'person'"):
        RunSpec.parse({"privacy_unit": "person"})
