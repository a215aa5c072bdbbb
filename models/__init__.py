"""Public tokenizer, text classifiers and the ModelSpec that rebuilds them.

Names load on first use (PEP 562): ``from models.family_defaults import ...`` and anything that
only needs a family's name or defaults (the CLI's help, the SDK) must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.encoders import EncoderError, SentenceEncoder, load_encoder
    from models.family_defaults import (
        DEFAULT_FAMILY,
        TrainingDefaults,
        default_max_seq_len,
        families,
        training_defaults,
    )
    from models.inputs import spec_encoder, text_inputs
    from models.spec import (
        ModelSpec,
        build_model,
        load_model_state,
        load_weights,
        model_state,
        save_weights,
    )
    from models.tokenizer import PublicTokenizer, load_tokenizer

_WHERE = {
    "DEFAULT_FAMILY": "models.family_defaults",
    "TrainingDefaults": "models.family_defaults",
    "default_max_seq_len": "models.family_defaults",
    "families": "models.family_defaults",
    "training_defaults": "models.family_defaults",
    "EncoderError": "models.encoders",
    "SentenceEncoder": "models.encoders",
    "load_encoder": "models.encoders",
    "spec_encoder": "models.inputs",
    "text_inputs": "models.inputs",
    "ModelSpec": "models.spec",
    "build_model": "models.spec",
    "load_model_state": "models.spec",
    "load_weights": "models.spec",
    "model_state": "models.spec",
    "save_weights": "models.spec",
    "PublicTokenizer": "models.tokenizer",
    "load_tokenizer": "models.tokenizer",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_FAMILY",
    "EncoderError",
    "ModelSpec",
    "PublicTokenizer",
    "SentenceEncoder",
    "TrainingDefaults",
    "build_model",
    "default_max_seq_len",
    "families",
    "load_encoder",
    "load_model_state",
    "load_tokenizer",
    "load_weights",
    "model_state",
    "save_weights",
    "spec_encoder",
    "text_inputs",
    "training_defaults",
]
