"""The Open Inference Protocol's tensors (KServe / Triton "V2"), shared by REST and gRPC.

A model takes one BYTES input tensor named ``text`` (shape ``[N]`` or ``[N, 1]``) and
gives ``label`` (BYTES ``[N]``: the most probable label) and ``probabilities`` (FP32
``[N, C]``, columns in the order of the labels in the model metadata's
``properties.labels``). A tensor the protocol or the model cannot take is a 400
(``bad_tensor``); everything else (credentials, tenant isolation, input limits) is the
predict service's (serving/predict.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.refusals import Refusal
from serving.runtime.model_cache import ServedModel

INPUT = "text"
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
PLATFORM = "pytorch"


def bad_tensor(message: str) -> Refusal:
    """A request whose tensors the protocol or this model cannot take: 400 / INVALID_ARGUMENT."""
    return Refusal(400, message)


# ------------------------------------------------------------------ tensors (both transports)


def decode_bytes_elements(raw: bytes, what: str) -> list[bytes]:
    """BYTES elements from the protocol's raw form: each a 4-byte little-endian length + bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise bad_tensor(f"{what}: truncated raw BYTES data (a length prefix is cut short).")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise bad_tensor(
                f"{what}: truncated raw BYTES data (an element of {size} bytes is cut short)."
            )
        out.append(raw[at : at + size])
        at += size
    return out


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def texts_from_input(
    name: str, datatype: str, shape: Sequence[int], elements: Sequence[bytes | str]
) -> list[str]:
    """The texts of the ``text`` input tensor, or a 400 saying what is wrong with it."""
    if name != INPUT:
        raise bad_tensor(f"Unknown input tensor {name!r}; this model takes one named {INPUT!r}.")
    if datatype != "BYTES":
        raise bad_tensor(f"Input {INPUT!r} should have datatype BYTES, not {datatype!r}.")
    shape = list(shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise bad_tensor(
            f"Input {INPUT!r} should have shape [N] or [N, 1] with N >= 1; got {shape}."
        )
    if len(elements) != shape[0]:
        raise bad_tensor(f"Input {INPUT!r} has shape {shape} but {len(elements)} elements.")
    texts = []
    for i, element in enumerate(elements):
        if isinstance(element, str):
            texts.append(element)
            continue
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            raise bad_tensor(f"Input {INPUT!r} element {i} is not valid UTF-8 text.") from None
    return texts


def single_input(names: Sequence[str]) -> None:
    if len(names) != 1:
        raise bad_tensor(
            f"Expected exactly one input tensor, named {INPUT!r}; got {len(names)}: {list(names)}."
        )


def requested_outputs(names: Sequence[str]) -> list[str]:
    """The outputs to return, in the order asked (all of them when none is named)."""
    for name in names:
        if name not in OUTPUTS:
            raise bad_tensor(f"Unknown output {name!r}; this model gives {list(OUTPUTS)}.")
    return list(names) or list(OUTPUTS)


@dataclass(frozen=True)
class Inference:
    """One answered request: the model that answered, its labels and probability rows."""

    model: str
    version: int
    labels: tuple[str, ...]
    probabilities: np.ndarray  # (N, C) float32, columns in ``labels`` order

    @classmethod
    def of(cls, served: ServedModel, rows: list[list[float]]) -> Inference:
        """The predict service's rows (``PredictService.rows``) as the protocol's tensors."""
        probabilities = np.asarray(rows, dtype=np.float32)
        return cls(served.name, served.version, served.spec.labels, probabilities)

    def labels_out(self) -> list[bytes]:
        return [self.labels[i].encode() for i in self.probabilities.argmax(axis=1)]


def model_metadata(served: ServedModel) -> dict[str, Any]:
    labels = served.spec.labels
    return {
        "name": served.name,
        "versions": [str(served.version)],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(labels)]},
        ],
        # The probabilities' columns; a JSON list in a string (gRPC's properties are strings).
        "properties": {"labels": json.dumps(list(labels)), "family": served.spec.family},
    }
