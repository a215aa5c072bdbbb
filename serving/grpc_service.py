"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on the predict service.

The service and messages are the protocol's public ``grpc_service.proto`` (KServe's
open-inference-protocol, serving/proto/), so Triton's and KServe's clients call it as they
are. The API key travels in the ``authorization`` metadata (``Bearer <key>``), the tenant
comes from it only, and a refusal has the status the REST adapter gives, mapped to gRPC:
401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND (another tenant's model too),
409 FAILED_PRECONDITION, 400/422 INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 500 INTERNAL.

The server is a ``grpc.aio`` server on the API's own event loop (started in the app's
lifespan), so its requests share the micro-batches of HTTP requests.

The generated modules register the ``inference.*`` messages in protobuf's default pool,
as Triton's client library does with its own copy of the protocol: the two cannot be
imported into one process. Import this module only where a gRPC server runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from starlette.concurrency import run_in_threadpool

from serving.credentials import bearer_credential
from serving.limits import Limits, TokenBuckets
from serving.oip import (
    EXTENSIONS,
    LABEL,
    PLATFORM,
    PROBABILITIES,
    SERVER_NAME,
    GrpcEndpoint,
    Inference,
    bad_tensor,
    decode_bytes_elements,
    encode_bytes_elements,
    infer,
    model_metadata,
    ready,
    requested_outputs,
    resolve,
    server_version,
    single_input,
    texts_from_input,
)
from serving.predict import PredictService, PredictTarget, Refusal
from serving.proto import grpc_service_pb2 as pb
from serving.proto import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("fedtext.serving.grpc")
T = TypeVar("T")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_code(refusal: Refusal) -> grpc.StatusCode:
    return _CODES.get(refusal.status, grpc.StatusCode.INTERNAL)


def _credential(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer_credential(value if isinstance(value, str) else value.decode())
    return None


class CallLimits:
    """The HTTP rate limits (serving/limits.py) for gRPC calls, with the same rules: a
    credential that has authenticated draws on its own bucket; any other, and every
    UNAUTHENTICATED answer, on its peer address's failure bucket."""

    def __init__(self, limits: Limits) -> None:
        self.rate, self.failed_rate = limits.rate_per_second, limits.failed_auth_per_second
        self.buckets = (
            TokenBuckets(self.rate, limits.burst, limits.max_buckets) if self.rate else None
        )
        self.failures = (
            TokenBuckets(self.failed_rate, limits.failed_auth_burst, limits.max_buckets)
            if self.failed_rate
            else None
        )
        self.known: OrderedDict[str, None] = OrderedDict()
        self.max_known = limits.max_buckets

    def admit(self, credential: str | None, peer: str) -> Refusal | None:
        """None when the call may go on, else its 429 refusal (before any database lookup)."""
        key = _hashed(credential) if credential is not None else None
        if key is not None and key in self.known and self.buckets is not None:
            wait = self.buckets.take(key)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return Refusal(
                    429,
                    f"Rate limit exceeded: {self.rate:g} requests per second per key; "
                    f"retry after {retry} s.",
                    {"retry-after": str(retry)},
                )
        elif key is not None and self.failures is not None:
            wait = self.failures.peek(peer)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return Refusal(
                    429,
                    f"Too many failed authentications from this address: "
                    f"{self.failed_rate:g} per second; retry after {retry} s.",
                    {"retry-after": str(retry)},
                )
        return None

    def answered(self, credential: str | None, peer: str, status: int) -> None:
        """Record how a call ended (an HTTP-like status) for the buckets. Every call that
        names a model resolves its credential first, so any status but 401 means the
        credential authenticated."""
        key = _hashed(credential) if credential is not None else None
        if status == 401:
            if self.failures is not None:
                self.failures.take(peer)
            if key is not None:
                self.known.pop(key, None)
        elif key is not None and key not in self.known:
            self.known[key] = None
            while len(self.known) > self.max_known:
                self.known.popitem(last=False)
            if self.buckets is not None:
                self.buckets.take(key)


def _hashed(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()[:32]


def _peer_address(context: grpc.aio.ServicerContext) -> str:
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:54321", "ipv6:[::1]:54321"
    return peer.rsplit(":", 1)[0]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's six calls over one predict service."""

    def __init__(self, service: PredictService, limits: Limits | None = None) -> None:
        self.service = service
        self.limits = CallLimits(limits) if limits is not None else None

    async def _abort(self, context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
        if refusal.headers and "retry-after" in refusal.headers:
            context.set_trailing_metadata((("retry-after", refusal.headers["retry-after"]),))
        await context.abort(status_code(refusal), refusal.detail)

    async def _model_call(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[[str | None], Awaitable[T]],
    ) -> T:
        """Run a call that names a model: rate limits, then ``work(credential)``; a
        Refusal becomes the call's status."""
        credential = _credential(context)
        peer = _peer_address(context)
        if self.limits is not None:
            refused = self.limits.admit(credential, peer)
            if refused is not None:
                await self._abort(context, refused)
        try:
            result = await work(credential)
        except Refusal as exc:
            if self.limits is not None:
                self.limits.answered(credential, peer, exc.status)
            await self._abort(context, exc)
            raise  # unreachable: abort raises
        if self.limits is not None:
            self.limits.answered(credential, peer, 200)
        return result

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        platform = self.service.platform
        ok = platform is not None and await run_in_threadpool(ready, platform)
        return pb.ServerReadyResponse(ready=ok)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS)
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        async def work(credential: str | None) -> bool:
            try:
                await resolve(self.service, credential, request.name, request.version)
            except Refusal as exc:
                if exc.status == 409:  # exists, nothing deployed: not ready
                    return False
                raise
            return True

        return pb.ModelReadyResponse(ready=await self._model_call(context, work))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def work(credential: str | None) -> PredictTarget:
            return await resolve(self.service, credential, request.name, request.version)

        meta = model_metadata(await self._model_call(context, work))
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
            properties=meta["properties"],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async def work(credential: str | None) -> tuple[Inference, list[str]]:
            # Authenticated first: a refusal of the tensors tells only a caller with a key,
            # and only an authenticated credential counts as one for the rate limits.
            target = await resolve(
                self.service, credential, request.model_name, request.model_version
            )
            texts = _texts(request)
            outputs = requested_outputs([o.name for o in request.outputs])
            return await infer(self.service, target, texts), outputs

        result, outputs = await self._model_call(context, work)
        n, c = result.probabilities.shape
        response = pb.ModelInferResponse(
            model_name=result.model, model_version=str(result.version), id=request.id
        )
        response.parameters["labels"].string_param = json.dumps(list(result.labels))
        for name in outputs:
            tensor = response.outputs.add()
            tensor.name = name
            if name == LABEL:
                tensor.datatype, tensor.shape[:] = "BYTES", [n]
                response.raw_output_contents.append(encode_bytes_elements(result.labels_out()))
            else:
                assert name == PROBABILITIES
                tensor.datatype, tensor.shape[:] = "FP32", [n, c]
                response.raw_output_contents.append(result.probabilities.astype("<f4").tobytes())
        return response


def _texts(request: pb.ModelInferRequest) -> list[str]:
    single_input([t.name for t in request.inputs])
    tensor = request.inputs[0]
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise bad_tensor(
                f"{len(raw)} raw_input_contents for 1 input tensor; send one per input."
            )
        if len(tensor.contents.bytes_contents):
            raise bad_tensor("Send the input in contents or in raw_input_contents, not both.")
        elements: list[bytes] = decode_bytes_elements(raw[0], f"Input {tensor.name!r}")
    else:
        elements = list(tensor.contents.bytes_contents)
    return texts_from_input(tensor.name, tensor.datatype, list(tensor.shape), elements)


async def start_grpc_server(
    service: PredictService, endpoint: GrpcEndpoint
) -> grpc.aio.Server | None:
    """A started ``grpc.aio`` server on the running event loop; stop it with ``stop(grace)``.

    None when the port is taken and ``endpoint.required`` is False (logged as a warning).
    """
    options = [
        ("grpc.max_receive_message_length", endpoint.max_message_bytes),
        ("grpc.max_send_message_length", 64 * 2**20),
        # gRPC binds with SO_REUSEPORT by default: a second server on a taken port would
        # silently share its connections with another process (and its tenants' keys).
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(service, endpoint.limits), server
    )
    address = f"{endpoint.host}:{endpoint.port}"
    try:
        if endpoint.certfile is not None and endpoint.keyfile is not None:
            credentials = grpc.ssl_server_credentials(
                [(endpoint.keyfile.read_bytes(), endpoint.certfile.read_bytes())]
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio: "Failed to bind to address ..."
        if endpoint.required:
            raise RuntimeError(f"The gRPC port {address} is not available: {exc}") from None
        log.warning(
            "gRPC port taken; serving HTTP only",
            extra={"fields": {"address": address, "error": str(exc)}},
        )
        return None
    await server.start()
    log.info(
        "gRPC server listening",
        extra={
            "fields": {"address": f"{endpoint.host}:{bound}", "tls": endpoint.certfile is not None}
        },
    )
    return server
