"""The predict fast lane: the predict service's ASGI adapter, without FastAPI's machinery.

On 2 cores, routing, dependency solving and the request/response objects of FastAPI cost
more per prediction than the batched forward pass. This ASGI layer, inside the
observability, body-size and rate-limit middlewares, answers ``POST
/v1/models/{name}/predict`` through the predict service (serving/predict.py) when the
service can resolve it without blocking (``PredictService.warm``: caller, deployed version
and model all in memory) and the body is one FastAPI would accept. It answers what the
service answers, refusals included (an input over a limit: 422). Anything else (a
credential or model that needs the database, a body FastAPI would refuse) goes to the
FastAPI route, the service's other adapter, unchanged, body included.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.credentials import request_credential
from serving.limits import send_bytes, send_json
from serving.predict import PredictService, parse_request
from serving.refusals import Refusal, v1_response

PREDICT_ROUTE = "/v1/models/{name}/predict"
_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lowercase bytes) of an ASGI request, or None
    (never used for Authorization: serving/credentials.py reads that one)."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class PredictFastLane:
    def __init__(self, app: ASGIApp, *, route: object, service: PredictService) -> None:
        self.app = app
        self.route = route  # the FastAPI route, so metrics and logs name the same template
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            _PREDICT.fullmatch(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        target = None
        if match is not None and header(scope, b"content-type") == "application/json":
            credential = request_credential(scope)
            target = self.service.warm(credential, match.group(1))
        if target is None:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            body = await _read_body(receive, messages)
        except HTTPException as exc:  # the body-size limit, while streaming (Starlette's:
            # FastAPI's HTTPException is a subclass, so catching that one missed it: a 500)
            await send_json(send, exc.status_code, {"detail": exc.detail}, {"Connection": "close"})
            return
        if body is None:  # the client went away
            return
        request = parse_request(body)
        if (
            request is None or request.explain
        ):  # explanations: the route (serving/runtime/explain.py)
            await self.app(scope, _replay(messages, receive), send)
            return
        scope["route"] = self.route
        try:
            content = await self.service.answer(target, request)
        except Refusal as exc:  # as the route's refusal handler answers it
            await v1_response(exc)(scope, receive, send)
            return
        await send_bytes(send, 200, content)


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
