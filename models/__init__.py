"""Public tokenizer, text classifiers and the ModelSpec that rebuilds them."""

from models.encoders import EncoderError, SentenceEncoder, load_encoder
from models.inputs import spec_encoder, text_inputs
from models.spec import (
    DEFAULT_FAMILY,
    ModelSpec,
    TrainingDefaults,
    build_model,
    default_max_seq_len,
    families,
    load_model_state,
    load_weights,
    model_state,
    save_weights,
    training_defaults,
)
from models.tokenizer import PublicTokenizer, load_tokenizer

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
