"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on the predict service.

The service and messages are the protocol's public ``grpc_service.proto`` (KServe's
open-inference-protocol, serving/proto/), so Triton's and KServe's clients call it as they
are. The API key travels in the ``authorization`` metadata (``Bearer <key>``), the tenant
comes from it only, and a refusal has the code serving/refusals.py maps its status to
(the REST adapters' status there): 404 NOT_FOUND for another tenant's model too.

The server is a ``grpc.aio`` server on the API's own event loop (started in the app's
lifespan), so its requests share the micro-batches of HTTP requests.

The generated modules register the ``inference.*`` messages in protobuf's default pool,
as Triton's client library does with its own copy of the protocol: the two cannot be
imported into one process. Import this module only where a gRPC server runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from starlette.concurrency import run_in_threadpool

from serving.credentials import (
    RepeatedAuthorization,
    bearer_credential,
    stop_watching,
    watch_authentication,
)
from serving.limits import Limits, RateGate
from serving.predict import PredictService, PredictTarget
from serving.proto import grpc_service_pb2 as pb
from serving.proto import grpc_service_pb2_grpc as pb_grpc
from serving.protocols.oip.codec import (
    LABEL,
    PLATFORM,
    PROBABILITIES,
    Inference,
    bad_tensor,
    decode_bytes_elements,
    encode_bytes_elements,
    model_metadata,
    requested_outputs,
    single_input,
    texts_from_input,
)
from serving.protocols.oip.server import (
    EXTENSIONS,
    SERVER_NAME,
    GrpcEndpoint,
    ready,
    server_version,
)
from serving.refusals import Refusal, grpc_code

log = logging.getLogger("fedtext.serving.grpc")
T = TypeVar("T")
# A status message is trailing metadata; clients refuse long ones (16 KiB by default).
MAX_DETAIL_CHARS = 1000


def _credential(context: grpc.aio.ServicerContext) -> str | None:
    """The bearer credential of the ``authorization`` metadata (the one parser's reading).

    Raises
    ------
    Refusal
        400 when the metadata repeats ``authorization`` (as HTTP refuses two headers).
    """
    found = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    if len(found) > 1:
        raise Refusal(400, RepeatedAuthorization.detail.replace("header", "metadata entry"))
    if not found:
        return None
    value = found[0]
    return bearer_credential(value if isinstance(value, str) else value.decode("latin-1"))


def _peer_address(context: grpc.aio.ServicerContext) -> str:
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:54321", "ipv6:[::1]:54321"
    return peer.rsplit(":", 1)[0]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's six calls over one predict service."""

    def __init__(self, service: PredictService, limits: Limits | None = None) -> None:
        self.service = service
        on = limits is not None and (
            limits.rate_per_second is not None or limits.failed_auth_per_second is not None
        )
        self.gate = RateGate.from_limits(limits) if on and limits is not None else None

    async def _abort(self, context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
        if refusal.headers and "retry-after" in refusal.headers:
            context.set_trailing_metadata((("retry-after", refusal.headers["retry-after"]),))
        detail = refusal.detail
        if len(detail) > MAX_DETAIL_CHARS:  # it may echo a name; status metadata is small
            detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
        await context.abort(grpc_code(refusal), detail)

    async def _model_call(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[[str | None], Awaitable[T]],
    ) -> T:
        """Run a call that names a model: rate limits (the HTTP API's rules,
        serving/limits.py), then ``work(credential)``; a Refusal becomes the call's status."""
        try:
            credential = _credential(context)
        except Refusal as exc:
            await self._abort(context, exc)
            raise  # unreachable: abort raises
        admission = None
        if self.gate is not None:
            admission = self.gate.admit(credential, _peer_address(context))
            if admission.refusal is not None:
                detail, retry = admission.refusal
                await self._abort(context, Refusal(429, detail, {"retry-after": str(retry)}))
        seen, token = watch_authentication()
        status = 200
        try:
            return await work(credential)
        except Refusal as exc:
            status = exc.status
            await self._abort(context, exc)
            raise  # unreachable: abort raises
        except Exception:
            # A server fault: logged here; the caller hears what HTTP says (grpc.aio would
            # send the exception's own text, which may name paths or SQL).
            status = 500
            log.exception("gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "Internal server error.")
            raise  # unreachable: abort raises
        finally:
            stop_watching(token)
            if self.gate is not None and admission is not None:
                self.gate.answered(admission, status, seen.succeeded)

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
                await self.service.resolve(credential, request.name, request.version)
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
            return await self.service.resolve(credential, request.name, request.version)

        meta = model_metadata((await self._model_call(context, work)).served)
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
            target = await self.service.resolve(
                credential, request.model_name, request.model_version
            )
            texts = _texts(request)
            outputs = requested_outputs([o.name for o in request.outputs])
            rows = await self.service.rows(target, texts)
            return Inference.of(target.served, rows), outputs

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
