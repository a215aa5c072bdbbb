"""Encoder runtimes: how a public sentence encoder's vectors are computed.

The vectors a head is trained on depend on the runtime and precision that computed them
(int8 moves a vector to cosine ~0.99 of fp32's), so a runtime *variant* is part of the
encoder's identity in a model spec (``EncoderHeadConfig.encoder_runtime``), next to the
encoder's name and the SHA-256 of its files: a node encodes its data with the variant
the spec names, and a server serves a head only on that variant.

Variants
--------
``torch-fp32``
    The exact reference: the Hugging Face model in torch, sentences in length-sorted
    groups (``SentenceEncoder.pooled``). What a spec without ``encoder_runtime`` (made
    before variants existed) was trained on.
``onnx-fp32``
    The same graph exported to ONNX (with the masked mean and the normalization) and run
    by ONNX Runtime. Same vectors to float rounding.
``onnx-int8``
    That graph with ONNX Runtime's dynamic int8 quantization of its MatMul weights
    (per output channel; per-tensor weights moved vectors to cosine 0.95).

``onnx-int8`` runs each sentence alone (a batch of one, at its own token length, no
padding), as many sentences at once as the process may use cores, on sessions of one
intra-op thread. Alone is what makes int8 exact in the sense that matters: dynamic
quantization scales activations per tensor, so in a batch the largest activation of any
sentence would set every sentence's rounding; alone, a sentence's vector is a function
of that sentence only, the same bits on the node that trained a head and on the server
that applies it, and never depending on another tenant's input. ``onnx-fp32`` pads
length-sorted groups of 16 (padding is masked, as in torch: equal to float rounding),
which costs 0.6x the CPU per sentence of running alone.

The export is done here, offline, on first use: from the installed encoder's files to
``<cache>/<encoder sha256>/<variant>-<recipe tag>.onnx`` with a JSON record of the graph's SHA-256,
checked on every load (a torn or altered file is exported again). The export is
deterministic: the same encoder files give the same graph bytes (tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.encoders import DEFAULT_ENCODER, EncoderError, SentenceEncoder, load_encoder

log = logging.getLogger("fedtext.models")

LEGACY_RUNTIME = "torch-fp32"  # what a spec without ``encoder_runtime`` was trained on
RUNTIMES = ("torch-fp32", "onnx-fp32", "onnx-int8")

# The accuracy gate: a variant is offered for training and serving only if heads trained
# on its vectors lose at most this much macro-F1 against torch-fp32's on the 1,000
# public test tweets. ``ACCURACY_CHANGE`` holds what bench/_encoders.py measured
# (2026-12-07, 2,000 training tweets, 1,000 test tweets, recipe revision 3); the serving
# bench re-measures it on every run and reports whether the gate still holds.
# onnx-fp32 gives torch's vectors to 1e-7 (the same head predictions).
ACCURACY_GATE = -0.005
ACCURACY_CHANGE = {"torch-fp32": 0.0, "onnx-fp32": 0.0, "onnx-int8": -0.0041}
OFFERED = tuple(v for v in RUNTIMES if ACCURACY_CHANGE[v] >= ACCURACY_GATE)
# An operator may accept a variant that missed the gate (its loss logged at every use).
ALLOW_UNGATED_ENV = "FEDTEXT_ENCODER_ALLOW_UNGATED"
# New specs and servers: torch-fp32 still. onnx-int8 passed the gate with a margin (0.09
# points) smaller than the gate's own noise, in one measurement; it is offered (a run's
# model config ``encoder_runtime``, a server's FEDTEXT_SERVE_ENCODER_RUNTIME), not imposed.
DEFAULT_RUNTIME = LEGACY_RUNTIME

ONNX_OPSET = 17
FP32_GROUP = 16  # sentences per onnx-fp32 run (as torch's serving groups)
# Bump when the export or quantization recipe below changes.
RECIPE_REVISION = 3
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_runtime(variant: str) -> str:
    """Return ``variant`` if it is offered here, else raise ValueError naming the choices."""
    if variant not in RUNTIMES:
        raise EncoderError(f"Unknown encoder runtime {variant!r}; known: {list(OFFERED)}.")
    if variant not in OFFERED:
        if os.environ.get(ALLOW_UNGATED_ENV) == "1":
            log.warning(
                "encoder runtime %s missed the accuracy gate (%+.4f macro-F1, gate %+.4f); "
                "used because %s=1",
                variant, ACCURACY_CHANGE[variant], ACCURACY_GATE, ALLOW_UNGATED_ENV,
            )  # fmt: skip
            return variant
        raise EncoderError(
            f"Encoder runtime {variant!r} is not offered: heads trained on its vectors lost "
            f"{-ACCURACY_CHANGE[variant]:.3f} macro-F1 against torch-fp32 (the gate allows "
            f"{-ACCURACY_GATE:.3f}); offered: {list(OFFERED)}. An operator who accepts the "
            f"loss sets {ALLOW_UNGATED_ENV}=1."
        )
    return variant


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class VectorRuntime(ABC):
    """Texts -> ``(n, dim)`` float32 L2-normalized sentence vectors, by one variant."""

    variant: str
    encoder: SentenceEncoder

    @property
    def sha256(self) -> str:
        """SHA-256 of the encoder files the vectors come from."""
        return self.encoder.sha256

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    @abstractmethod
    def exact(self) -> bool:
        """True when a sentence's vector does not depend on the others encoded with it."""

    @abstractmethod
    def encode(self, texts: Sequence[str], max_seq_len: int) -> torch.Tensor:
        """``(len(texts), dim)`` float32 unit vectors on the CPU, in the order of ``texts``
        (an ordinary tensor: a head may be trained on it)."""


class TorchRuntime(VectorRuntime):
    """The reference: ``SentenceEncoder.encode`` (torch, fp32, length-sorted groups)."""

    variant = "torch-fp32"

    def __init__(self, encoder: SentenceEncoder) -> None:
        self.encoder = encoder

    @property
    def exact(self) -> bool:
        return True

    def encode(self, texts: Sequence[str], max_seq_len: int) -> torch.Tensor:
        return self.encoder.encode(texts, max_seq_len)


class _Pooled(nn.Module):
    """The encoder with its masked mean and normalization: what the ONNX graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


def cache_dir() -> Path:
    """Where exported graphs live: ``FEDTEXT_ENCODER_CACHE``, else the user's cache."""
    given = os.environ.get("FEDTEXT_ENCODER_CACHE")
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedtext" / "encoders"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _export_fp32(encoder: SentenceEncoder, target: Path) -> None:
    ids = encoder.tokenizer(["an example sentence"], return_tensors="pt")
    args = tuple(ids[k] if k in ids else torch.zeros_like(ids["input_ids"]) for k in _INPUTS)
    axes: dict[str, dict[int, str]] = {k: {0: "batch", 1: "tokens"} for k in _INPUTS}
    axes["vectors"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow in HF code
        torch.onnx.export(
            _Pooled(encoder.model).eval(),
            args,
            str(target),
            input_names=list(_INPUTS),
            output_names=["vectors"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: deterministic, needs no onnxscript
        )


def _quantize_int8(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The output projections of attention and of the feed-forward block stay fp32; the
    # query/key/value and feed-forward up-projections are int8. Measured on the gate
    # (bench/_encoders.py, 2,000/1,000 tweets): every MatMul int8 -0.006 macro-F1 (mean
    # cosine 0.992), feed-forward output fp32 -0.006 (0.996), both outputs fp32 -0.0041
    # (0.996): the gate's noise is about as large as the differences.
    model = onnx.load(str(source))
    keep_fp32 = [
        n.name for n in model.graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
    ]
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its advice to "pre-process" the model, on every call
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep_fp32,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        quiet.setLevel(level)


def export_graph(encoder: SentenceEncoder, variant: str, directory: Path | None = None) -> Path:
    """The ONNX graph of ``encoder`` for ``variant`` (``onnx-*``), exported on first use.

    Cached as ``<directory>/<encoder sha256>/<variant>-<tag>.onnx`` with a ``.json``
    recording its SHA-256; a file whose bytes no longer match its record is exported
    again. Returns the graph's path.
    """
    if not variant.startswith("onnx-"):
        raise ValueError(f"{variant!r} is not an ONNX variant.")
    folder = (directory or cache_dir()) / encoder.sha256
    name = f"{variant}-{_recipe_tag(variant)}"
    target, record = folder / f"{name}.onnx", folder / f"{name}.json"
    with _export_lock:
        if target.is_file() and record.is_file():
            try:
                saved = json.loads(record.read_text())
                if saved.get("graph_sha256") == _file_sha256(target):
                    return target
            except (OSError, ValueError):
                pass
            log.warning("encoder graph %s does not match its record: exporting it again", target)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _export_fp32(encoder, fp32)
            made = fp32
            if variant == "onnx-int8":
                made = Path(tmp) / "int8.onnx"
                _quantize_int8(fp32, made)
            info = {
                "encoder": encoder.ref,
                "encoder_sha256": encoder.sha256,
                "variant": variant,
                "graph_sha256": _file_sha256(made),
                "opset": ONNX_OPSET,
                "torch": torch.__version__,
            }
            os.replace(made, target)  # same folder: atomic; concurrent exports agree
        record.write_text(json.dumps(info, indent=1, sort_keys=True))
        log.info("exported %s of %s to %s", variant, encoder.ref, target)
    return target


_export_lock = threading.Lock()


def _recipe_tag(variant: str) -> str:
    """What else shapes the graph's bytes: the tools' versions and this recipe's revision
    (a graph made by other versions is exported anew, never mixed up with this one)."""
    import onnxruntime

    recipe = (
        f"{variant}|{ONNX_OPSET}|{RECIPE_REVISION}|{torch.__version__}|{onnxruntime.__version__}"
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


class OnnxRuntime(VectorRuntime):
    """ONNX Runtime on the CPU, one sentence per run, sentences in parallel across cores.

    Parameters
    ----------
    encoder
        The encoder (tokenizer, files, hash); its torch weights are read only to export.
    variant
        ``onnx-fp32`` or ``onnx-int8``.
    workers
        Sentences run at once (one intra-op thread each); default: the usable cores.
    """

    def __init__(
        self,
        encoder: SentenceEncoder,
        variant: str,
        *,
        workers: int | None = None,
        directory: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        if variant not in ("onnx-fp32", "onnx-int8"):
            raise ValueError(f"{variant!r} is not an ONNX variant.")
        self.encoder = encoder
        self.variant = variant
        self.graph = export_graph(encoder, variant, directory)
        options = ort.SessionOptions()
        # One thread per run: a sentence's matrices are small (tokens x 384), and two
        # sentences on two cores beat one sentence split across both (measured).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.graph), options, providers=["CPUExecutionProvider"]
        )
        self.workers = workers or usable_cores()
        # fp32 pads sentences of similar length into groups (masked: a vector does not
        # depend on its group); int8 cannot (its activation scale is per tensor), so each
        # sentence runs alone. CPU per sentence measured here: fp32 6.7 ms in groups of 16
        # vs 10.8 ms alone; int8 4.6 ms in groups vs 7.6 ms alone (torch fp32: 10.8 ms).
        self.group = FP32_GROUP if variant == "onnx-fp32" else 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fedtext-encoder")
        self._lock = threading.Lock()

    @property
    def exact(self) -> bool:
        # int8 runs each sentence alone; fp32 pads a group, masked out as in torch (equal
        # to float rounding).
        return True

    def token_ids(self, texts: Sequence[str], max_seq_len: int) -> list[list[int]]:
        """Each text's token ids, truncated to the encoder's limit (no padding)."""
        length = min(max_seq_len, self.encoder.max_positions)
        # A lone surrogate (valid in a JSON string, not in UTF-8) reads as U+FFFD, as in
        # SentenceEncoder.pooled.
        clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        ids: list[list[int]] = self.encoder.tokenizer(
            clean, truncation=True, max_length=length, padding=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]  # fmt: skip
        return ids

    def _run(self, ids: list[list[int]], groups: list[list[int]], out: np.ndarray) -> None:
        for rows in groups:
            width = max(len(ids[i]) for i in rows)
            tokens = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(tokens)
            for j, i in enumerate(rows):
                tokens[j, : len(ids[i])] = ids[i]
                mask[j, : len(ids[i])] = 1
            feed = {"input_ids": tokens, "attention_mask": mask,
                    "token_type_ids": np.zeros_like(tokens)}  # fmt: skip
            out[rows] = self.session.run(None, feed)[0]

    def encode(self, texts: Sequence[str], max_seq_len: int) -> torch.Tensor:
        ids = self.token_ids(texts, max_seq_len)
        out = np.empty((len(ids), self.encoder.dim), dtype=np.float32)
        n = len(ids)
        # Length-sorted groups, each padded to its longest (one sentence per group for int8).
        order = sorted(range(n), key=lambda i: len(ids[i]))
        groups = [order[i : i + self.group] for i in range(0, n, self.group)]
        if len(groups) <= 1 or self.workers == 1:
            self._run(ids, groups, out)
        else:
            # Interleaved groups: each worker gets a similar mix of short and long ones.
            parts = [groups[w :: self.workers] for w in range(min(self.workers, len(groups)))]
            futures = [self._pool.submit(self._run, ids, part, out) for part in parts]
            for future in futures:
                future.result()
        with self._lock:
            self.encoder.texts_encoded += n
        return torch.from_numpy(out)


_loaded: dict[tuple[str, str, str], VectorRuntime] = {}
_loaded_lock = threading.Lock()


def load_runtime(
    ref: str = DEFAULT_ENCODER, variant: str = DEFAULT_RUNTIME, device: torch.device | None = None
) -> VectorRuntime:
    """One shared runtime per (encoder, variant, device) in this process.

    ``torch-fp32`` runs on ``device``; the ONNX variants run on the CPU (vectors must be the
    same bits wherever a head is trained or served). Any known variant loads (a node
    follows the spec it is sent; the benchmark measures every variant); which ones new
    specs and servers may choose is ``check_runtime``'s (the accuracy gate)."""
    if variant not in RUNTIMES:
        raise EncoderError(f"Unknown encoder runtime {variant!r}; known: {list(RUNTIMES)}.")
    onnx = variant.startswith("onnx-")
    key = (ref, variant, "cpu" if onnx else str(device or "cpu"))
    with _loaded_lock:
        found = _loaded.get(key)
        if found is None:
            if onnx:
                found = OnnxRuntime(load_encoder(ref), variant)
            else:
                found = TorchRuntime(load_encoder(ref, device))
            _loaded[key] = found
        return found


def describe_runtime(runtime: VectorRuntime) -> dict[str, Any]:
    """What served: variant, encoder, hash, and the graph for ONNX variants."""
    out: dict[str, Any] = {"runtime": runtime.variant, "encoder": runtime.encoder.ref,
                           "encoder_sha256": runtime.sha256}  # fmt: skip
    if isinstance(runtime, OnnxRuntime):
        out.update(graph=str(runtime.graph), workers=runtime.workers)
    return out
