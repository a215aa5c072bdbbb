"""RunSpec: one owner of every run setting; the other surfaces agree with it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from models import families, training_defaults
from orchestration.simulation import SimulationConfig
from runs.spec import AUTO, SIMULATION_ONLY, RunSpec, defaults, key
from server.strategy import strategy_names
from serving.schemas import RUN_SETTINGS, RunCreate

ROOT = Path(__file__).resolve().parents[2]


def test_pyprojects_run_config_keys_and_defaults_equal_runspec() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == defaults()


def test_left_out_family_settings_take_the_familys_defaults_everywhere() -> None:
    for family in families():
        family_defaults = training_defaults(family)
        spec = RunSpec.from_run_config({"model": family, "rounds": AUTO, "batch-size": ""})
        request = RunCreate(model=family)
        simulation = SimulationConfig(model=family, tenants=["a", "b"])
        for made in (spec, request, simulation):
            assert made.rounds == family_defaults.rounds
            assert made.batch_size == family_defaults.batch_size
            assert made.personalize_epochs == family_defaults.personalize_epochs


def test_choices_come_from_the_registries_and_bad_values_name_the_setting() -> None:
    for strategy in strategy_names():
        assert RunSpec(strategy=strategy).strategy == strategy
    with pytest.raises(ValueError, match=r"strategy: Unknown strategy 'fedsgd'; known: fedadam"):
        RunSpec.from_run_config({"strategy": "fedsgd"})
    with pytest.raises(ValueError, match=r"learning-rate: learning-rate should be a positive"):
        RunSpec.from_run_config({"learning-rate": 0})
    with pytest.raises(ValueError, match=r"clip-norm: The clipping norm should be a positive"):
        RunSpec.from_run_config({"clip-norm": 0})
    with pytest.raises(ValueError, match=r"deploy: Unknown deploy policy 'sometimes'"):
        RunSpec.from_run_config({"deploy": "sometimes"})
    assert RunCreate(deploy="always").settings()["deploy"] == "always"
    with pytest.raises(ValueError, match=r"rownds: not a run setting"):
        RunSpec.from_run_config({"rownds": 3})


def test_the_http_request_has_runspecs_bounds_and_defaults() -> None:
    schema = RunCreate.model_json_schema()["properties"]
    for name in RUN_SETTINGS:
        field = RunSpec.model_fields[name]
        prop = schema["model_config" if name == "family_config" else name]
        assert prop.get("description") == field.description
    assert schema["epsilon"]["exclusiveMinimum"] == 0 and schema["epsilon"]["maximum"] == 100
    assert RunCreate().epsilon == RunSpec().epsilon


def test_a_run_config_round_trips_through_runspec() -> None:
    spec = RunSpec.from_run_config(
        {
            "model": "lstm",
            "labels": "a, b ,c",
            "participants": "x,y",
            "model-config": '{"hidden_dim": 16}',
        }
    )
    assert spec.labels == ("a", "b", "c") and spec.participants == ("x", "y")
    again = RunSpec.from_run_config(spec.run_config())
    assert again == spec
    assert RunSpec.parse(spec.public()) == spec
    assert set(spec.server_part()) == {key(n) for n in RunSpec.model_fields} - {
        key(n) for n in SIMULATION_ONLY
    }


def test_the_simulation_sends_its_nodes_only_their_data_share() -> None:
    sim = SimulationConfig(tenants=["a", "b"], max_train_examples=10, inject_fault="a:1")
    assert sim.client_overrides() == {
        "tenants": "a,b",
        "partitioning": "iid",
        "alpha": 0.5,
        "max-train-examples": 10,
        "max-test-examples": 500,
        "seed": 7,
        # privacy-unit user: the nodes count and train per user only if they know (issue 29)
        "privacy-unit": "example",
        "user-column": "user",
        "max-examples-per-user": 8,
        "inject-fault": "a:1",
    }
    server = sim.server_overrides("r1")
    assert server["run-id"] == "r1" and RunSpec.from_run_config(server).run_id == "r1"
    with pytest.raises(ValueError, match="at least two tenants"):
        SimulationConfig(tenants=["a"])
