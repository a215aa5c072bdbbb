"""The one predict service: credential -> caller -> deployed model -> checked inputs -> answer.

Every way in is a thin adapter over ``PredictService`` (serving/protocols/): /v1 REST
(the ASGI fast lane and the FastAPI route), /v2 REST and gRPC (the Open Inference
Protocol). Each parses the credential with ``bearer_credential``, asks ``resolve`` (or
``warm``) for the target and ``rows`` for the probabilities (/v1 through ``answer``), and
answers a ``Refusal`` through serving/refusals.py, the one place that maps it to an HTTP
status or a gRPC code. So a refusal has one status and one message whichever adapter
meets it.

Resolution is memoized (serving/runtime/lookups.py): when the memo knows the caller and the
deployed version and the model is in memory, nothing touches the database and nothing
leaves the event loop; otherwise one thread hop does all the database work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session, select

from models.encoders import DEFAULT_ENCODER
from models.tokenizer import load_tokenizer
from serving.config import ServingConfig
from serving.credentials import (  # bearer_credential re-exported: the one parser
    bearer_credential,  # noqa: F401
    note_authenticated,
)
from serving.refusals import Refusal, refusal_for, unauthorized
from serving.runtime.batching import InputRejected
from serving.runtime.lookups import Caller, PredictLookups
from serving.runtime.model_cache import (
    ModelCache,
    ModelLoadError,
    NotDeployed,
    ServedModel,
    UnknownModel,
    top_labels,
)
from serving.schemas import PredictRequest
from tenancy.events import Change, ChangeKind
from tenancy.platform import Platform
from tenancy.tables import ModelVersion
from tenancy.tenants import Scope, authenticate, has_scope

log = logging.getLogger("fedtext.serving")


def authenticate_caller(session: Session, credential: str | None) -> Caller:
    """The live key and tenant behind ``credential`` (the tenant comes from it only)."""
    if credential is None:
        raise unauthorized()
    found = authenticate(session=session, presented=credential)
    if found is None:
        raise unauthorized()
    note_authenticated()  # the rate limiter limits it per key from now on
    return Caller(*found)


def require_scope(caller: Caller, scope: Scope) -> Caller:
    if not has_scope(caller.key, scope):
        raise Refusal(403, f"This key lacks the {scope} scope.")
    return caller


@dataclass(frozen=True)
class PredictTarget:
    caller: Caller
    served: ServedModel


@dataclass
class PredictService:
    """Resolves, checks, infers and encodes predictions for every adapter."""

    platform: Platform | None  # None: no database (warm answers only; tests)
    cache: ModelCache
    lookups: PredictLookups
    config: ServingConfig = field(default_factory=ServingConfig)

    # ------------------------------------------------------------- credential -> model

    def warm(self, credential: str | None, name: str) -> PredictTarget | None:
        """The target when the memo and the cache hold all of it, else None (never blocks).

        None says nothing about the request: ``resolve`` gives it its answer or refusal.
        """
        caller = self.lookups.caller(credential) if credential is not None else None
        if caller is not None:
            note_authenticated()  # a live key, memoized
        if caller is None or not has_scope(caller.key, Scope.predict):
            return None
        ref = self.lookups.deployed(caller.tenant.id, name)
        served = (
            self.cache.cached((ref.tenant_id, ref.name, ref.version), ref.quantize)
            if ref is not None
            else None
        )
        return PredictTarget(caller, served) if served is not None else None

    async def resolve(self, credential: str | None, name: str, version: str = "") -> PredictTarget:
        """Caller and deployed model of a prediction; Refusal 401, 403, 404, 409 or 500.

        A ``version`` other than the deployed one is not served (404); "" asks for the
        deployed one (the Open Inference Protocol names versions as strings).
        """
        target = self.warm(credential, name)
        if target is None:
            target = await run_in_threadpool(self.resolve_cold, credential, name)
        if version and version != str(target.served.version):
            raise Refusal(
                404,
                f"Version {version} of {name!r} is not served; the deployed version is "
                f"{target.served.version}.",
            )
        return target

    def resolve_cold(self, credential: str | None, name: str) -> PredictTarget:
        """``resolve`` from the database, loading the model if needed (blocking).

        The session is closed before the request waits in a batch, so a parked request never
        holds a pooled connection (64 waiting requests could otherwise hold the pool while
        the threads that would release it wait for a connection).
        """
        if self.platform is None:
            raise RuntimeError("This predict service has no database.")
        generation = self.lookups.generation
        with Session(self.platform.engine, expire_on_commit=False) as session:
            caller = require_scope(authenticate_caller(session, credential), Scope.predict)
            assert credential is not None  # authenticate_caller refused a missing one
            self.lookups.put_caller(credential, caller.key, caller.tenant, generation)
            try:
                served, row = self.cache.get_deployed(session, caller.tenant.id, name)
            except UnknownModel as exc:
                # Another tenant's model and a missing one look the same: 404.
                detail = _unknown_model(session, caller.tenant, exc)
                raise refusal_for(exc, detail) from None
            except NotDeployed as exc:
                raise refusal_for(exc) from None
            except ModelLoadError as exc:
                # The reason and the blob's identity; never key material nor request content.
                log.error(
                    "stored model failed to load",
                    extra={
                        "fields": {
                            "tenant": caller.tenant.id,
                            "model": name,
                            "reason": exc.reason,
                            "detail": str(exc),
                        }
                    },
                )
                raise refusal_for(exc) from None
            self.lookups.put_deployed(row, generation)
        return PredictTarget(caller, served)

    # ------------------------------------------------------------- inputs -> answer

    def check_inputs(self, inputs: list[str]) -> None:
        """Refusal 422 naming the limit when ``inputs`` may not be predicted."""
        config = self.config
        if len(inputs) > config.max_predict_inputs:
            raise Refusal(
                422, f"At most {config.max_predict_inputs} inputs per request; got {len(inputs)}."
            )
        for i, text in enumerate(inputs):
            if len(text) > config.max_input_chars:
                raise Refusal(
                    422,
                    f"inputs[{i}] has {len(text)} characters; "
                    f"the limit is {config.max_input_chars}.",
                )
            if not text.strip():
                raise Refusal(422, f"inputs[{i}] is empty.")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    # Refused here, not in a batch: a failed batch is rerun request by
                    # request, so one such input would cost a pass per request sharing it.
                    raise Refusal(
                        422,
                        f"inputs[{i}] holds a lone surrogate (U+{ord(text[exc.start]):04X}), "
                        "which is not Unicode text; send UTF-8.",
                    ) from None

    async def rows(self, target: PredictTarget, texts: list[str]) -> list[list[float]]:
        """The probability rows of ``texts``: inputs checked, inferred in a shared batch.

        Every adapter's one path to the model (/v1 through ``answer``, /v2 and gRPC
        directly). Callers resolve first: an unauthenticated request hears 401 whatever
        it sent.
        """
        self.check_inputs(texts)
        try:
            return await target.served.predict_rows(texts)
        except InputRejected as exc:  # this request's own input; others in its batch ran
            raise refusal_for(exc) from None

    async def answer(self, target: PredictTarget, request: PredictRequest) -> bytes:
        """/v1's PredictResponse as JSON bytes, from ``rows``.

        Serialized here, not through a response model: validating and dumping every
        LabelScore again cost more than the batched forward pass per request.
        """
        served = target.served
        rows = await self.rows(target, request.inputs)
        body = prediction_body(served, rows, request.top_k)
        warnings = unknown_token_warnings(served.spec, request.inputs)
        if warnings:  # only when some input is mostly unreadable: other bodies are unchanged
            body["warnings"] = warnings
        return json.dumps(body).encode()

    # ------------------------------------------------------------- tenancy changes

    def tenancy_changed(self, change: Change) -> None:
        """A committed tenancy write (subscribed in serving/app.py): nothing stale survives it.

        A change alters only its tenant's memoized answers: those are forgotten (the next
        request of each of its callers asks the database once). A deleted tenant's
        decrypted models leave memory too: no plaintext outlives its data key.
        """
        self.lookups.forget_tenant(change.tenant_id)
        if change.kind == ChangeKind.tenant_deleted:
            for key in self.cache.cached_keys():
                if key[0] == change.tenant_id:
                    self.cache.evict(key)


def parse_request(body: bytes) -> PredictRequest | None:
    """The request in ``body``, or None where FastAPI's own validation answers (its 422s)."""
    try:
        return PredictRequest.model_validate_json(body)
    except ValueError:  # pydantic's ValidationError
        return None


def prediction_body(served: ServedModel, rows: list[list[float]], top_k: int) -> dict[str, Any]:
    """The PredictResponse as plain data."""
    labels = served.spec.labels
    predictions = [
        [{"label": label, "score": score} for label, score in top_labels(labels, row, top_k)]
        for row in rows
    ]
    return {"model": served.name, "version": served.version, "predictions": predictions}


def _unknown_model(session: Session, tenant: Any, exc: Exception) -> str:
    """A 404's message; a tenant with no model at all is told how to train its first."""
    has_any = session.exec(select(ModelVersion.id).where(ModelVersion.tenant_id == tenant.id))
    if has_any.first() is not None:
        return str(exc)
    return (
        f"{exc} Tenant {tenant.name!r} has no model yet: train one with fedtext simulate "
        f"--tenant {tenant.name} --tenant OTHER_TENANT (or POST /v1/runs with an admin key)."
    )


# An input at least this share of whose tokens the vocabulary cannot read gets a warning.
UNKNOWN_SHARE_WARNING = 0.5


def unknown_token_warnings(spec: Any, texts: list[str]) -> list[dict[str, Any]]:
    """Per mostly unreadable input: how many of its tokens the public vocabulary does not
    know ([UNK]); such inputs all look alike to the model. ASCII text is never checked (the
    vocabulary reads every ASCII character), nor models on an operator's own encoder."""
    if getattr(spec.family_config(), "encoder", DEFAULT_ENCODER) != DEFAULT_ENCODER:
        return []
    out = []
    for i, text in enumerate(texts):
        if text.isascii():
            continue
        tokens = load_tokenizer().tokens(text)[1:-1]  # less [CLS] and [SEP]
        unknown = tokens.count("[UNK]")
        if tokens and unknown / len(tokens) >= UNKNOWN_SHARE_WARNING:
            out.append(
                {
                    "input": i,
                    "unknown_tokens": unknown,
                    "tokens": len(tokens),
                    "message": f"{unknown} of {len(tokens)} tokens are unknown to the model's "
                    "vocabulary (English MiniLM); its prediction is unreliable. Other "
                    "languages: an encoder-head model on a multilingual encoder "
                    "(FEDTEXT_ENCODERS, README).",
                }
            )
    return out
