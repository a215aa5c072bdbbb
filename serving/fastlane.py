"""The predict fast lane: a prediction answered on the event loop without FastAPI's machinery.

On 2 cores, routing, dependency solving and the request/response objects of FastAPI cost
more per prediction than the batched forward pass. This ASGI layer, inside the
observability, body-size and rate-limit middlewares, answers ``POST
/v1/models/{name}/predict`` itself only when everything the answer needs is already in
memory: the credential and the deployed version in the lookup memo (serving/lookups.py),
the model in the cache, and a body that validates. Anything else (an unknown or
insufficient key, a model to load, a body FastAPI would refuse) goes to the FastAPI route
unchanged, body included, so every error keeps one source and one shape.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.config import ServingConfig
from serving.limits import send_json
from serving.lookups import Caller, PredictLookups
from serving.registry import ModelCache, ServedModel, top_labels
from serving.schemas import PredictRequest
from tenancy.tenants import Scope as KeyScope
from tenancy.tenants import has_scope

PREDICT_ROUTE = "/v1/models/{name}/predict"
_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


def warm_target(
    lookups: PredictLookups, cache: ModelCache, credential: str, name: str
) -> tuple[Caller, ServedModel] | None:
    """The caller and model of a prediction when the memo and the cache hold both, else None
    (the request then asks the database, which also gives every refusal its status)."""
    caller = lookups.caller(credential)
    if caller is None or not has_scope(caller.key, KeyScope.predict):
        return None
    row = lookups.deployed(caller.tenant.id, name)
    served = cache.cached(row) if row is not None else None
    return (caller, served) if served is not None else None


def input_problem(inputs: list[str], config: ServingConfig) -> str | None:
    """Why ``inputs`` may not be predicted (a 422 message), or None."""
    if len(inputs) > config.max_predict_inputs:
        return f"At most {config.max_predict_inputs} inputs per request; got {len(inputs)}."
    for i, text in enumerate(inputs):
        if len(text) > config.max_input_chars:
            return f"inputs[{i}] has {len(text)} characters; the limit is {config.max_input_chars}."
        if not text.strip():
            return f"inputs[{i}] is empty."
    return None


def prediction_body(served: ServedModel, rows: list[list[float]], top_k: int) -> dict[str, Any]:
    """The PredictResponse as plain data (serialized without a second validation)."""
    labels = served.spec.labels
    predictions = [
        [{"label": label, "score": score} for label, score in top_labels(labels, row, top_k)]
        for row in rows
    ]
    return {"model": served.name, "version": served.version, "predictions": predictions}


class PredictFastLane:
    def __init__(
        self,
        app: ASGIApp,
        *,
        route: object,
        config: ServingConfig,
        lookups: PredictLookups,
        cache: ModelCache,
    ) -> None:
        self.app = app
        self.route = route  # the FastAPI route, so metrics and logs name the same template
        self.config = config
        self.lookups = lookups
        self.cache = cache

    def _target(self, scope: Scope) -> ServedModel | None:
        match = _PREDICT.fullmatch(scope["path"])
        if match is None:
            return None
        token = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
        if token is None or content_type != b"application/json":
            return None
        scheme, _, credential = token.partition(" ")
        if scheme.lower() != "bearer":
            return None
        warm = warm_target(self.lookups, self.cache, credential, match.group(1))
        return warm[1] if warm is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        served = self._target(scope)
        if served is None:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            body = await _read_body(receive, messages)
        except HTTPException as exc:  # the body-size limit, while streaming
            await send_json(send, exc.status_code, {"detail": exc.detail})
            return
        if body is None:  # the client went away
            return
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError:
            request = None
        if request is None or input_problem(request.inputs, self.config) is not None:
            await self.app(scope, _replay(messages, receive), send)
            return
        scope["route"] = self.route
        rows = await served.predict_rows(request.inputs)
        await send_json(send, 200, prediction_body(served, rows, request.top_k))


async def _read_body(receive: Receive, messages: list[Message]) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read, then the live ones."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
