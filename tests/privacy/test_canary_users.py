"""Canary users (issue 29): each canary is a user of several rows, so the one-run audit's
lower bound checks the user-level claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.data import DataError, LabeledData
from clients.local_data import NodeData, with_canaries
from fedtext.bootstrap import scratch_platform
from orchestration.canary_federation import run_canary_audit
from privacy.canary import make_canaries
from tests.factories import toy_data


def test_canary_users_are_members_with_all_their_rows_under_one_user() -> None:
    base = toy_data(20)
    train = LabeledData(base.texts, base.labels, base.label_names, ("u1", "u2") * 10)
    data = with_canaries(NodeData("a", train, toy_data(4)), seed=5, count=12, rows=3)
    members = [c for c in make_canaries(5, 12, 3) if c.member]
    assert len(data.train) == 20 + 3 * len(members)
    assert data.train.users is not None
    added = data.train.users[20:]
    assert len(set(added)) == len(members) and all(added.count(u) == 3 for u in set(added))
    assert not set(added) & {"u1", "u2"}
    with pytest.raises(DataError, match="user column"):
        with_canaries(NodeData("a", toy_data(20), toy_data(4)), seed=5, count=12, rows=3)


@pytest.mark.slow
def test_user_level_canary_audit_stays_below_the_accounted_user_epsilon(tmp_path: Path) -> None:
    report = run_canary_audit(
        open_platform=scratch_platform,
        data_dir=tmp_path / "canary", rounds=1, epsilon=3.0, canaries=40, seed=99,
        max_train_examples=160, secure_mode=False, privacy_unit="user", canary_rows=4,
    )  # fmt: skip
    assert report.outcome.canaries == 40
    assert 0 <= report.lower_bound <= report.accounted_epsilon
    assert report.accounted_epsilon > 3.0  # training 3 plus the released evaluation
