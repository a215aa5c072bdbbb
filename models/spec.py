"""ModelSpec: the JSON that travels with every model version so anyone can rebuild it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from models.encoder_head import FAMILY as ENCODER_HEAD
from models.encoder_head import EncoderHeadClassifier, EncoderHeadConfig
from models.encoders import describe as describe_encoder
from models.family_defaults import FAMILIES, default_max_seq_len, families
from models.lstm import LSTMClassifier, LSTMConfig
from models.runtimes import DEFAULT_RUNTIME, check_runtime
from models.transformer import (
    MiniLMClassifier,
    MiniLMConfig,
    TransformerClassifier,
    TransformerConfig,
)

SPEC_VERSION = 1

# Family registry: name -> (config class, builder). Unknown names raise ValueError.
_FAMILIES: dict[str, tuple[type, Callable[[Any, int], nn.Module]]] = {
    ENCODER_HEAD: (EncoderHeadConfig, lambda cfg, n: EncoderHeadClassifier(cfg, n)),
    "lstm": (LSTMConfig, lambda cfg, n: LSTMClassifier(cfg, n)),
    "transformer": (TransformerConfig, lambda cfg, n: TransformerClassifier(cfg, n)),
    "minilm": (MiniLMConfig, lambda cfg, n: MiniLMClassifier(cfg, n)),
}
if set(_FAMILIES) != set(FAMILIES):  # the light names (models.family_defaults) are these
    raise RuntimeError(f"models.family_defaults: {FAMILIES}; registry: {sorted(_FAMILIES)}.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    labels: tuple[str, ...]
    max_seq_len: int = 48
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: str = "minilm-l6-wordpiece"
    spec_version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"Unknown model family {self.family!r}; known: {families()}.")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError("labels should hold at least two distinct names.")
        if self.max_seq_len < 3:
            raise ValueError("max_seq_len should be at least 3.")
        if self.tokenizer != "minilm-l6-wordpiece":
            raise ValueError(f"Unknown tokenizer {self.tokenizer!r}.")
        if self.spec_version != SPEC_VERSION:
            raise ValueError(f"Unsupported spec_version {self.spec_version}.")
        config = self.family_config()  # validates the family's options now, not at build time
        if self.family == ENCODER_HEAD and not config.encoder_sha256:
            raise ValueError("An encoder-head spec must carry its encoder's encoder_sha256.")

    @classmethod
    def create(cls, family: str, labels: list[str] | tuple[str, ...], **kwargs: Any) -> ModelSpec:
        max_seq_len = kwargs.pop("max_seq_len", None) or default_max_seq_len(family)
        if family == ENCODER_HEAD:
            # New heads are trained on the default runtime variant (one that passed the
            # accuracy gate); a variant named by the run must be offered here.
            kwargs["encoder_runtime"] = check_runtime(
                kwargs.get("encoder_runtime") or DEFAULT_RUNTIME
            )
        config_cls = _FAMILIES[family][0] if family in _FAMILIES else None
        try:
            config = dataclasses.asdict(config_cls(**kwargs)) if config_cls else dict(kwargs)
        except TypeError as exc:
            raise ValueError(f"Invalid {family} config: {exc}") from None
        if family == ENCODER_HEAD and not config["encoder_sha256"]:
            # The spec names the encoder by the hash of its files, read where it is created.
            found = describe_encoder(config["encoder"])
            config.update(encoder_sha256=found["sha256"], encoder_dim=found["dim"])
        return cls(family=family, labels=tuple(labels), max_seq_len=max_seq_len, config=config)

    def family_config(self) -> Any:
        config_cls = _FAMILIES[self.family][0]
        try:
            return config_cls(**self.config)
        except TypeError as exc:
            raise ValueError(f"Invalid {self.family} config: {exc}") from exc

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"ModelSpec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("ModelSpec JSON should be an object.")
        data["labels"] = tuple(data.get("labels", ()))
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"Invalid ModelSpec: {exc}") from exc

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh model for ``spec`` (random weights; public frozen parts loaded)."""
    return _FAMILIES[spec.family][1](spec.family_config(), len(spec.labels))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors, each once: parameters plus persistent buffers.

    ``state_dict()`` lists aliased tensors twice (Opacus's DPLSTM does), which safetensors
    refuses; named_parameters() yields each shared tensor once. Tensors under the
    model's ``public_prefixes`` (frozen public pretrained parts) are left out: they are
    rebuilt from the public package, never shipped to the server nor stored.
    """
    public: tuple[str, ...] = tuple(getattr(model, "public_prefixes", ()))
    state = {
        k: v.detach() for k, v in model.named_parameters() if not (public and k.startswith(public))
    }
    non_persistent = {
        f"{mod_name}.{b}" if mod_name else b
        for mod_name, mod in model.named_modules()
        for b in mod._non_persistent_buffers_set
    }
    for k, v in model.named_buffers():
        if k not in non_persistent and not (public and k.startswith(public)):
            state[k] = v.detach()
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``model`` in place; the key sets and shapes must match exactly."""
    own = model_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"Weights do not fit the model: missing {missing}, unexpected {unexpected}."
        )
    with torch.no_grad():
        for name, target in own.items():
            source = state[name]
            if source.shape != target.shape:
                raise ValueError(
                    f"Weights do not fit the model: {name} has shape {tuple(source.shape)}, "
                    f"expected {tuple(target.shape)}."
                )
            target.copy_(source.to(dtype=target.dtype, device=target.device))
    return model


def save_weights(model: nn.Module) -> bytes:
    """Serialize the model's tensors as safetensors bytes (never pickle)."""
    return st_save({k: v.cpu().contiguous() for k, v in model_state(model).items()})


def load_weights(model: nn.Module, data: bytes) -> nn.Module:
    """Load safetensors bytes into ``model`` in memory."""
    try:
        state: dict[str, torch.Tensor] = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"Weights are not valid safetensors data: {exc}") from exc
    return load_model_state(model, state)
