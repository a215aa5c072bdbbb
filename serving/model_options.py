"""Schemas of the per-version serving options (kept apart from serving/schemas.py)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from serving.runtime.optimize import QUANTIZE_MODES, check_quantize


class ServingOptions(BaseModel):
    quantize: str | None = Field(
        default=None,
        description=f"null (float32 as trained) or one of {list(QUANTIZE_MODES)}.",
    )

    @field_validator("quantize")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return check_quantize(value)


class ServingOptionsPublic(ServingOptions):
    name: str
    version: int
    deployed: bool
