"""Public tokenizer, text classifiers and the ModelSpec that rebuilds them."""

from models.spec import (
    ModelSpec,
    build_model,
    families,
    load_model_state,
    load_weights,
    model_state,
    save_weights,
)
from models.tokenizer import PublicTokenizer, load_tokenizer

__all__ = [
    "ModelSpec",
    "PublicTokenizer",
    "build_model",
    "families",
    "load_model_state",
    "load_tokenizer",
    "load_weights",
    "model_state",
    "save_weights",
]
