"""TEMPORARY during the issue-15 split: removed once server/ reads runs.spec.RunSpec."""

from typing import Any

from runs.spec import RunSpec


class ServerRunConfig(RunSpec):
    @classmethod
    def from_mapping(cls, *layers: Any) -> Any:
        return cls.from_run_config(*layers)
