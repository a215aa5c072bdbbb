"""Served models: decrypted in memory on first use, kept in an LRU bounded by count and bytes.

A head of the ``encoder-head`` family served on the process's shared encoder
(serving/runtime/shared_encoder.py) is a few kilobytes: heads count against the bytes bound only,
so tens of thousands fit where ``max_models`` whole models do.

The encrypted blobs sit behind ``tenancy.blobs.BlobStore``; ``tenancy.registry`` checks
each blob's SHA-256 (recorded in the database) before it decrypts, in memory only. Here a
decrypted model lives exactly as long as its cache entry: eviction drops the last
reference to its tensors.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from sqlmodel import Session, select

from models import EncoderError, ModelSpec, build_model, load_weights, spec_encoder, text_inputs
from models.encoder_head import FAMILY as ENCODER_HEAD
from serving.metrics import ServingMetrics
from serving.runtime.batching import MicroBatcher, Rows
from serving.runtime.optimize import prepare_for_inference, resident_bytes
from serving.runtime.shared_encoder import CrossTenantBatcher, SharedEncoders, SharedHead
from tenancy.errors import DecryptionError, IntegrityError, NotFound
from tenancy.platform import Platform
from tenancy.registry import deployed_version, read_model_weights, untrusted_deployment
from tenancy.tables import ModelVersion

log = logging.getLogger("fedtext.serving.registry")

CacheKey = tuple[str, str, int]  # (tenant id, model name, version)

# What a cached head holds beyond its tensors' bytes (module, parameter and cache-entry
# objects), so that the bytes bound counts what memory heads really take. Measured in
# bench/serving.py (resident memory from 20 to 2,000 heads): about 8 KiB a head.
HEAD_OVERHEAD_BYTES = 8 * 1024


class UnknownModel(NotFound):
    """The tenant has no model of that name (another tenant's model looks the same)."""


class NotDeployed(NotFound):
    """The model exists but no version of it is deployed."""


class ModelLoadError(Exception):
    """A stored model could not be loaded; ``reason`` is safe to log and to count."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # integrity | decryption | missing | format | encoder


@functools.lru_cache(maxsize=256)
def parse_spec(spec_json: str) -> ModelSpec:
    """``ModelSpec.from_json``, parsed once per distinct spec: thousands of tenants' heads
    of one recipe share one (frozen) spec object instead of ~1.5 KB each (tracemalloc).
    A spec that does not parse raises each time (errors are not cached)."""
    return ModelSpec.from_json(spec_json)


def run_batch(model: torch.nn.Module, spec: ModelSpec, texts: list[str]) -> Rows:
    """Class probabilities for ``texts`` in one forward pass (blocking; call off the loop).

    Inputs are encoded as in training (token ids padded to ``max_seq_len``, or sentence
    vectors with padding masked out), so an input's scores do not depend on which other
    inputs share its batch.
    """
    inputs = text_inputs(spec, texts)
    with torch.inference_mode():
        probs = torch.softmax(model(*inputs), dim=-1)
    rows: Rows = probs.tolist()
    return rows


@dataclass(eq=False)
class ServedModel:
    tenant_id: str
    name: str
    version: int
    spec: ModelSpec
    model: torch.nn.Module
    quantize: str | None
    nbytes: int  # decrypted float weights; the LRU's byte bound counts these
    load_seconds: float
    batcher: MicroBatcher | SharedHead | None = field(default=None, repr=False)
    # A head on the shared encoder: counted by bytes only, batched across tenants.
    shared: bool = False

    @property
    def key(self) -> CacheKey:
        return (self.tenant_id, self.name, self.version)

    def infer(self, texts: list[str]) -> Rows:
        """Blocking forward pass over ``texts`` (no batching with other requests)."""
        return run_batch(self.model, self.spec, texts)

    async def predict_rows(self, texts: list[str]) -> Rows:
        """Probability rows, through the micro-batcher when there is one."""
        if self.batcher is None:
            return self.infer(texts)
        return await self.batcher.submit(texts)

    def predict(self, texts: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        """Top-``top_k`` (label, score) pairs per input (blocking)."""
        return [top_labels(self.spec.labels, row, top_k) for row in self.infer(texts)]


def top_labels(labels: tuple[str, ...], row: list[float], top_k: int) -> list[tuple[str, float]]:
    order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[: min(top_k, len(row))]
    return [(labels[i], row[i]) for i in order]


def load_served_model(
    session: Session,
    platform: Platform,
    row: ModelVersion,
    check_encoder: Callable[[ModelSpec], object] | None = None,
) -> ServedModel:
    """Fetch, check, decrypt and rebuild one model version, in memory only (no cache).

    ``check_encoder`` refuses (EncoderError) an encoder-head spec whose encoder is not the
    one it will run on; by default the process's CPU encoder of that name is loaded and
    checked (``models.spec_encoder``).
    """
    started = time.perf_counter()
    try:
        weights = read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row
        )
    except IntegrityError as exc:
        raise ModelLoadError(str(exc), "integrity") from None
    except DecryptionError as exc:
        raise ModelLoadError(str(exc), "decryption") from None
    except NotFound as exc:  # the blob, or the tenant's data key, is gone
        raise ModelLoadError(str(exc), "missing") from None
    try:
        spec = parse_spec(row.spec_json)
        if spec.family == ENCODER_HEAD:
            # A head trained on other features is refused here, at load.
            (check_encoder or spec_encoder)(spec)
        model = load_weights(build_model(spec), weights)
    except EncoderError as exc:
        raise ModelLoadError(f"{row.name} v{row.version}: {exc}", "encoder") from None
    except ValueError as exc:
        raise ModelLoadError(f"{row.name} v{row.version}: {exc}", "format") from None
    del weights  # the plaintext bytes; only the model's tensors hold the weights now
    nbytes = resident_bytes(model)
    model = prepare_for_inference(model, row.quantize)
    return ServedModel(
        tenant_id=row.tenant_id,
        name=row.name,
        version=row.version,
        spec=spec,
        model=model,
        quantize=row.quantize,
        nbytes=nbytes,
        load_seconds=time.perf_counter() - started,
    )


def _family(row: ModelVersion) -> str | None:
    try:
        return parse_spec(row.spec_json).family
    except ValueError:
        return None  # load_served_model refuses it with its reason


def find_deployed(session: Session, tenant_id: str, name: str) -> ModelVersion:
    """The deployed version row; UnknownModel or NotDeployed otherwise (one query when found)."""
    row = deployed_version(session=session, tenant_id=tenant_id, name=name)
    if row is not None:
        return row
    exists = session.exec(
        select(ModelVersion.id).where(
            ModelVersion.tenant_id == tenant_id, ModelVersion.name == name
        )
    ).first()
    if exists is None:
        raise UnknownModel(f"No model named {name!r}.")
    # Rows marked deployed whose signature does not verify: not served, and not "not
    # deployed" either (a 500 with the integrity message; the reason goes to the log).
    forged = untrusted_deployment(session=session, tenant_id=tenant_id, name=name)
    if forged is not None:
        raise ModelLoadError(forged, "integrity")
    raise NotDeployed(f"Model {name!r} has no deployed version.")


class ModelCache:
    """LRU of decrypted models keyed by (tenant, name, version), bounded by count and bytes.

    Thread-safe. Concurrent lookups of a model that is not in memory wait for one load
    (single flight); the lock is never held while a model loads, so other models stay
    served meanwhile. A model larger than ``max_bytes`` on its own is still served, alone.
    """

    def __init__(
        self,
        platform: Platform,
        *,
        max_models: int = 32,
        max_bytes: int = 512 * 2**20,
        metrics: ServingMetrics | None = None,
        make_batcher: Callable[[ServedModel], MicroBatcher] | None = None,
        heads: SharedEncoders | None = None,
    ) -> None:
        if max_models < 1:
            raise ValueError("max_models should be at least 1.")
        if max_bytes < 1:
            raise ValueError("max_bytes should be positive.")
        self.platform = platform
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.metrics = metrics or ServingMetrics()
        self._make_batcher = make_batcher
        self.heads = heads  # None: encoder-head models are served per model, like the others
        self._items: OrderedDict[CacheKey, ServedModel] = OrderedDict()
        self._bytes = 0
        self._models = 0  # entries that count against max_models (not shared heads)
        self._loading: dict[
            tuple[CacheKey, str | None], concurrent.futures.Future[ServedModel]
        ] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def models(self) -> int:
        """Cached whole models (the entries ``max_models`` bounds; heads are not counted)."""
        return self._models

    def cached_keys(self) -> list[CacheKey]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def get_deployed(
        self, session: Session, tenant_id: str, name: str
    ) -> tuple[ServedModel, ModelVersion]:
        """The deployed version of ``name`` for ``tenant_id`` (loaded on first use) and its row."""
        return self.get_current(session, find_deployed(session, tenant_id, name))

    def get_current(self, session: Session, row: ModelVersion) -> tuple[ServedModel, ModelVersion]:
        """The model for ``row``; if ``row`` went stale while it loaded, the current one.

        A data-key rotation re-encrypts a tenant's blobs under new blob keys and deletes
        the old ones: a row read just before it commits names a blob that is gone (or a
        data key that is). The row is then read again, once, and loaded as it is now.
        """
        stale_blob = row.blob_key  # the re-read below updates ``row`` itself if it is in session
        try:
            return self.get(session, row), row
        except ModelLoadError as exc:
            if exc.reason in ("format", "encoder"):
                raise
            current = session.exec(
                select(ModelVersion)
                .where(ModelVersion.id == row.id)
                .execution_options(populate_existing=True)
            ).first()
            if current is None or current.blob_key == stale_blob:
                raise  # not a rotation: the stored model itself is at fault
            return self.get(session, current), current

    def get(self, session: Session, row: ModelVersion) -> ServedModel:
        """The model for ``row`` from memory, or loaded once however many callers ask."""
        key: CacheKey = (row.tenant_id, row.name, row.version)
        flight = (key, row.quantize)
        with self._lock:
            served = self._hit(key, row.quantize)
            if served is not None:
                return served
            pending = self._loading.get(flight)
            leader = pending is None
            if pending is None:
                pending = self._loading[flight] = concurrent.futures.Future()
                self.metrics.cache_misses.inc()
        if not leader:
            return pending.result()  # re-raises the leader's error: no retry storm
        try:
            served = self._load(session, row)
        except BaseException as exc:
            with self._lock:
                del self._loading[flight]
            if isinstance(exc, ModelLoadError):
                self.metrics.load_failures.labels(exc.reason).inc()
            pending.set_exception(exc)
            raise
        self.metrics.load_seconds.labels(served.spec.family, str(served.quantize)).observe(
            served.load_seconds
        )
        if self._make_batcher is not None and served.batcher is None:
            served.batcher = self._make_batcher(served)
        with self._lock:
            del self._loading[flight]
            self._drop(key)  # a stale entry (other quantization) of the same version
            self._items[key] = served
            self._bytes += served.nbytes
            self._models += not served.shared
            while len(self._items) > 1 and (
                self._models > self.max_models or self._bytes > self.max_bytes
            ):
                self._drop(self._victim())
            self._publish()
        pending.set_result(served)
        return served

    def _load(self, session: Session, row: ModelVersion) -> ServedModel:
        """Load ``row``; an encoder-head model goes on the shared encoder when there is one."""
        heads = self.heads
        if heads is None or _family(row) != ENCODER_HEAD:
            return load_served_model(session, self.platform, row)
        batchers: list[CrossTenantBatcher] = []

        def check(spec: ModelSpec) -> None:
            # Checked against the shared runtime: the encoder weights in memory.
            batchers.append(heads.batcher(spec))

        served = load_served_model(session, self.platform, row, check_encoder=check)
        layers = getattr(served.model, "head", None)
        if isinstance(layers, torch.nn.Sequential) and len(layers) == 1:
            # A linear head (the DP default) is its one nn.Linear: a third of the Python
            # objects per cached head, the same function of the sentence vector.
            served.model = layers[0]
        served.batcher = batchers[0].attach(served.model, served.spec, row.tenant_id)
        served.shared = True
        served.nbytes += HEAD_OVERHEAD_BYTES
        return served

    def _victim(self) -> CacheKey:
        """The entry to drop: the least recently used one of the bound that is exceeded."""
        if self._models > self.max_models:
            return next(k for k, v in self._items.items() if not v.shared)
        return next(iter(self._items))

    def cached(self, key: CacheKey, quantize: str | None) -> ServedModel | None:
        """The model of version ``key`` with ``quantize``, if in memory (a hit); never loads."""
        with self._lock:
            return self._hit(key, quantize)

    def _hit(self, key: CacheKey, quantize: str | None) -> ServedModel | None:
        served = self._items.get(key)
        if served is None or served.quantize != quantize:
            return None
        self._items.move_to_end(key)
        self.metrics.cache_hits.inc()
        return served

    def evict(self, key: CacheKey) -> bool:
        """Drop ``key`` from memory; True if it was there."""
        with self._lock:
            found = self._drop(key)
            self._publish()
            return found

    def clear(self) -> None:
        with self._lock:
            for key in list(self._items):
                self._drop(key)
            self._publish()

    def _drop(self, key: CacheKey) -> bool:
        served = self._items.pop(key, None)
        if served is None:
            return False
        self._bytes -= served.nbytes
        self._models -= not served.shared
        self.metrics.cache_evictions.inc()
        # Requests already holding the model finish with it; then nothing references it.
        log.info(
            "model evicted",
            extra={"fields": {"tenant": key[0], "model": key[1], "version": key[2]}},
        )
        return True

    def _publish(self) -> None:
        self.metrics.cache_models.set(len(self._items))
        self.metrics.cache_bytes.set(self._bytes)
