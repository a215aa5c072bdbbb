"""One public sentence encoder per process, shared by every tenant's private head.

An ``encoder-head`` model is a public encoder (the expensive part) and a private head of
a few kilobytes. Served per tenant, each tenant's requests would pay for their own
encoder forward passes (per-model batches of about one input under uniform traffic over
many tenants). Here, as multi-adapter servers do with LoRA adapters (LoRAX, S-LoRA):

- ``EncoderRuntime``: the encoder once per process, run by the runtime variant the
  operator chooses (``FEDTEXT_SERVE_ENCODER_RUNTIME``, models/runtimes.py; torch fp32,
  the exact reference, by default). A head is served only on the variant its spec
  names: the vectors it was trained on.
- ``CrossTenantBatcher``: concurrent requests of *all* tenants join one batch; one
  encoder pass computes every sentence vector; then each request's own decrypted head is
  applied to its own rows only.

Isolation. An input's sentence vector does not depend on which other inputs share its
forward pass: sentences are padded to their group's longest and padding is masked out of
attention and of the mean, as in training (``models.encoders.SentenceEncoder``). That
holds to float rounding (about 1e-7) in ``fp32`` and for the grouped ONNX variants, and
exactly for onnx-int8 (each sentence runs alone). The torch reduced precisions do not
guarantee it (int8 dynamic quantization scales activations per tensor, so a batch's
largest activation sets everyone's rounding; bf16 kernels may block by batch shape):
in those modes each forward pass holds the inputs of one tenant only. A bad input (one
the tokenizer refuses) fails its own request alone: the batch is retried request by
request. No sentence vector is kept after its request is answered (no cache).
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import EncoderError, ModelSpec, SentenceEncoder, load_encoder
from models.encoder_head import FAMILY as ENCODER_HEAD
from models.runtimes import (
    DEFAULT_RUNTIME,
    LEGACY_RUNTIME,
    RUNTIMES,
    VectorRuntime,
    check_runtime,
)
from models.runtimes import load_runtime as load_vector_runtime
from serving.runtime.batching import BatchQueue, InputRejected, Request, Rows

# fp32 first: the exact default. bf16 and int8 trade exactness for CPU speed
# (docs/BENCHMARKS.md has the measured speed and accuracy of each).
ENCODER_PRECISIONS = ("fp32", "bf16", "int8")
ENCODER_DEVICES = ("auto", "cpu", "cuda")
# Sentences per encoder forward inside a batch, after sorting by length: a group is padded
# only to its own longest sentence. On a CPU, per-sentence cost hardly falls with larger
# groups while padding grows with them; on a GPU larger groups fill the device.
CPU_GROUP = 16
CUDA_GROUP = 128


def check_precision(precision: str) -> str:
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(
            f"Unknown encoder precision {precision!r}; known: {list(ENCODER_PRECISIONS)}."
        )
    return precision


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU."""
    if name not in ENCODER_DEVICES:
        raise ValueError(f"Unknown encoder device {name!r}; known: {list(ENCODER_DEVICES)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("The encoder device is cuda, but torch sees no CUDA device.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EncoderRuntime:
    """A loaded public encoder as served: texts -> L2-normalized sentence vectors.

    Parameters
    ----------
    encoder
        The process's shared encoder (``models.load_encoder``): weights, tokenizer, hash.
    precision
        ``fp32`` (exact), ``bf16`` (autocast), or ``int8`` (dynamic quantization of the
        linear layers; CPU only).
    group_size
        Sentences per forward pass; default by device.
    variant
        The runtime variant (models/runtimes.py): ``torch-fp32`` runs the torch model at
        ``precision``; an ONNX variant computes the vectors itself.
    """

    def __init__(
        self,
        encoder: SentenceEncoder,
        precision: str = "fp32",
        group_size: int | None = None,
        *,
        variant: str = LEGACY_RUNTIME,
    ) -> None:
        self.encoder = encoder
        self.precision = check_precision(precision)
        if variant not in RUNTIMES:
            raise ValueError(f"Unknown encoder runtime {variant!r}; known: {list(RUNTIMES)}.")
        self.variant = variant
        self.device = encoder.device
        self.group_size = group_size or (CUDA_GROUP if self.device.type == "cuda" else CPU_GROUP)
        if self.group_size < 1:
            raise ValueError("group_size should be at least 1.")
        # An ONNX variant computes the vectors itself (its own graph, threads, no torch
        # weights held); precision is a setting of the torch runtime only.
        self.vectors: VectorRuntime | None = None
        if variant != LEGACY_RUNTIME:
            if precision != "fp32":
                raise ValueError(
                    f"Encoder precision {precision!r} applies to the torch-fp32 runtime only; "
                    f"{variant} fixes its own precision."
                )
            self.vectors = load_vector_runtime(encoder.ref, variant)
            self.model: nn.Module | None = None
            self._lock = threading.Lock()
            return
        model: nn.Module = encoder.model
        if precision == "int8":
            if self.device.type != "cpu":
                raise ValueError("int8 dynamic quantization runs on the CPU only.")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao's notice about its future move
                model = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
                )
        self.model = model
        self._lock = threading.Lock()  # one forward at a time: torch already uses the cores

    @property
    def sha256(self) -> str:
        """SHA-256 of the encoder files whose weights are in memory (checked at load)."""
        return self.encoder.sha256

    @property
    def exact(self) -> bool:
        """True when an input's vector is independent of its batch (to float rounding)."""
        return self.vectors.exact if self.vectors is not None else self.precision == "fp32"

    def check(self, spec: ModelSpec) -> None:
        """Refuse (EncoderError) a head trained on another encoder's features."""
        config = spec.family_config()
        if config.encoder_runtime != self.variant:
            raise EncoderError(
                f"This model was trained on vectors of encoder {config.encoder!r} computed by "
                f"the {config.encoder_runtime} runtime; this server computes them with "
                f"{self.variant} (FEDTEXT_SERVE_ENCODER_RUNTIME). Its head would read other "
                "features than it learned from: serve it where the encoder runtime is "
                f"{config.encoder_runtime}, or train it again on {self.variant}."
            )
        if config.encoder_sha256 != self.sha256:
            raise EncoderError(
                f"This model was trained on encoder {config.encoder!r} with SHA-256 "
                f"{config.encoder_sha256[:12]}...; this server's encoder ({self.encoder.path}) "
                f"has SHA-256 {self.sha256[:12]}.... Its head would read meaningless features: "
                "serve it where the same encoder files are installed."
            )
        if config.encoder_dim != self.encoder.dim:
            raise EncoderError(
                f"Encoder {config.encoder!r} gives {self.encoder.dim}-dim vectors, "
                f"the head expects {config.encoder_dim}."
            )

    def encode(self, texts: Sequence[str], max_seq_len: int) -> torch.Tensor:
        """``(len(texts), dim)`` float32 unit vectors on the CPU, in the order of ``texts``."""
        if self.vectors is not None:
            return self.vectors.encode(texts, max_seq_len)  # an ordinary tensor already
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        with self._lock, torch.inference_mode(), autocast:
            vectors = self.encoder.pooled(
                texts, max_seq_len, model=self.model, group=self.group_size
            )
        return vectors.clone()  # a normal tensor: callers may train on it (bench/serving.py)


class SharedEncoders:
    """This process's encoder runtimes (one per encoder named by a head) and their batchers.

    Parameters mirror the per-model batcher's (serving/runtime/batching.py); ``on_batch`` is called
    with (inputs, requests) of every cross-tenant batch, ``observe`` with the seconds of
    every encoder pass.
    """

    def __init__(
        self,
        *,
        executor: Executor,
        runtime: str = DEFAULT_RUNTIME,
        precision: str = "fp32",
        device: str = "auto",
        max_batch: int = 64,
        max_wait: float = 0.002,
        max_inflight: int = 1,
        on_batch: Callable[[int, int], None] | None = None,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.runtime = check_runtime(runtime)
        self.precision = check_precision(precision)
        if runtime != LEGACY_RUNTIME and precision != "fp32":
            raise ValueError(
                f"Encoder precision {precision!r} applies to the torch-fp32 runtime only; "
                f"{runtime} fixes its own precision."
            )
        # The ONNX variants run on the CPU (the same bits as on the nodes that trained).
        self.device = pick_device(device) if runtime == LEGACY_RUNTIME else torch.device("cpu")
        self._executor = executor
        self._batch_options: dict[str, Any] = dict(
            max_batch=max_batch, max_wait=max_wait, max_inflight=max_inflight,
            on_batch=on_batch, observe=observe,
        )  # fmt: skip
        self._batchers: dict[str, CrossTenantBatcher] = {}
        self._lock = threading.Lock()

    def batcher(self, spec: ModelSpec) -> CrossTenantBatcher:
        """The batcher of the encoder ``spec`` names, loaded once; EncoderError on mismatch."""
        if spec.family != ENCODER_HEAD:
            raise ValueError(f"Only {ENCODER_HEAD} models run on the shared encoder.")
        ref = spec.family_config().encoder
        with self._lock:  # loads are rare (once per encoder), so one lock for all is fine
            batcher = self._batchers.get(ref)
            if batcher is None:
                runtime = EncoderRuntime(
                    load_encoder(ref, self.device), self.precision, variant=self.runtime
                )
                batcher = CrossTenantBatcher(
                    runtime, executor=self._executor, **self._batch_options
                )
                self._batchers[ref] = batcher
        batcher.runtime.check(spec)
        return batcher


@dataclass(eq=False)
class SharedHead:
    """A tenant's head on the shared encoder: what a ServedModel submits its texts through.

    Holds the head's module and spec, not the ServedModel: no reference cycle, so an
    evicted head is freed when its last request is done.
    """

    batcher: CrossTenantBatcher
    head: nn.Module
    tenant_id: str
    max_seq_len: int

    async def submit(self, texts: Sequence[str]) -> Rows:
        return await self.batcher.submit(self, texts)


class CrossTenantBatcher(BatchQueue):
    """Coalesce concurrent requests of every tenant into shared encoder passes.

    The scheduling is ``BatchQueue``'s (serving/runtime/batching.py), as for one model's batches;
    a request is tagged with its tenant's ``SharedHead``.
    """

    def __init__(
        self,
        runtime: EncoderRuntime,
        *,
        observe: Callable[[float], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.runtime = runtime
        self._observe = observe

    def attach(self, head: nn.Module, spec: ModelSpec, tenant_id: str) -> SharedHead:
        return SharedHead(self, head, tenant_id, spec.max_seq_len)

    async def submit(self, head: SharedHead, texts: Sequence[str]) -> Rows:
        """Probability rows of ``head`` for ``texts``, computed in some shared batch."""
        return await self._enqueue(head, texts)

    # ------------------------------------------------------------- the forward pass

    def run_requests(self, requests: list[Request]) -> list[Rows | BaseException]:
        """Each request's probability rows, or the error that its own inputs caused.

        Blocking (an inference thread). Requests are grouped into encoder passes (by
        sequence limit; also by tenant unless the precision is exact); a pass that fails
        is retried request by request, so only a request whose input is at fault fails.
        """
        started = time.perf_counter()
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (head, _) in enumerate(requests):
            tenant = "" if self.runtime.exact else head.tenant_id
            groups.setdefault((head.max_seq_len, tenant), []).append(i)
        results: list[Rows | BaseException] = [[] for _ in requests]
        for (max_seq_len, _), members in groups.items():
            texts = [t for i in members for t in requests[i][1]]
            try:
                vectors = self.runtime.encode(texts, max_seq_len)
            except Exception:
                for i in members:  # one at a time: the bad input fails alone
                    try:
                        results[i] = _apply(
                            requests[i][0], self.runtime.encode(requests[i][1], max_seq_len)
                        )
                    except Exception as exc:
                        results[i] = self._rejected(requests[i][1], max_seq_len) or exc
                continue
            offset = 0
            for i in members:
                n = len(requests[i][1])
                try:
                    results[i] = _apply(requests[i][0], vectors[offset : offset + n])
                except Exception as exc:
                    results[i] = exc
                offset += n
        if self._observe is not None:
            self._observe(time.perf_counter() - started)
        return results

    def _rejected(self, texts: list[str], max_seq_len: int) -> InputRejected | None:
        """The first of ``texts`` that the encoder refuses on its own (a 422), if any."""
        for i, text in enumerate(texts):
            try:
                self.runtime.encode([text], max_seq_len)
            except Exception as exc:
                return InputRejected(
                    i, f"the encoder's tokenizer refused it ({type(exc).__name__})"
                )
        return None  # the request fails as a whole: a server error, not the input's fault


def _apply(head: SharedHead, vectors: torch.Tensor) -> Rows:
    with torch.inference_mode():
        rows: Rows = torch.softmax(head.head(vectors), dim=-1).tolist()
    return rows
