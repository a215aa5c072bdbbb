"""Open Inference Protocol (KServe / Triton "V2") over REST: an adapter over the predict service.

A model takes one BYTES input tensor named ``text`` (shape ``[N]`` or ``[N, 1]``) and
gives ``label`` (BYTES ``[N]``: the most probable label) and ``probabilities`` (FP32
``[N, C]``, columns in the order of the labels in the model metadata's
``properties.labels``). Credentials, tenant isolation and input limits are the predict
service's (serving/predict.py): another tenant's model is a 404 exactly like a missing one.

Both JSON tensors and Triton's binary tensor extension (``Inference-Header-Content-Length``:
a JSON header followed by raw tensor bytes, BYTES elements as 4-byte little-endian length
+ bytes) are read and written, so ``tritonclient.http`` works with its defaults. The gRPC
adapter (serving/grpc_service.py) shares the tensor checks and outputs defined here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text as sql_text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from serving.batching import InputRejected
from serving.credentials import request_credential
from serving.limits import Limits
from serving.predict import PredictService, PredictTarget, Refusal

INPUT = "text"
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
PLATFORM = "pytorch"
SERVER_NAME = "fedtext"
EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "inference-header-content-length"

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@dataclass(frozen=True)
class GrpcEndpoint:
    """Where the gRPC server listens; TLS when both ``certfile`` and ``keyfile`` are given."""

    port: int
    host: str = "127.0.0.1"
    certfile: Path | None = None
    keyfile: Path | None = None
    # The largest request message, bytes (the HTTP body limit's counterpart).
    max_message_bytes: int = 1 << 20
    # False: a port that is taken only loses gRPC (a warning), as for the default port, so
    # a second server on the host still serves HTTP; True (a port asked for): startup fails.
    required: bool = True
    # The HTTP API's per-key and failed-authentication rate limits, applied to gRPC calls.
    limits: Limits | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("The gRPC port should be between 0 and 65535.")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("gRPC TLS needs both a certificate file and a key file.")


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

    def labels_out(self) -> list[bytes]:
        return [self.labels[i].encode() for i in self.probabilities.argmax(axis=1)]


async def infer(service: PredictService, target: PredictTarget, texts: list[str]) -> Inference:
    """The resolved model's probabilities for ``texts`` (the predict service's checks and
    batcher). Callers resolve first: an unauthenticated request hears 401 whatever it sent."""
    service.check_inputs(texts)
    try:
        rows = await target.served.predict_rows(texts)
    except InputRejected as exc:  # the tokenizer refused one of this request's inputs
        raise Refusal(422, str(exc)) from None
    served = target.served
    return Inference(
        served.name, served.version, served.spec.labels, np.asarray(rows, dtype=np.float32)
    )


async def resolve(
    service: PredictService, credential: str | None, name: str, version: str = ""
) -> PredictTarget:
    """The deployed model; a version other than the deployed one is not served (404)."""
    target = await service.resolve(credential, name)
    if version and version != str(target.served.version):
        raise Refusal(
            404,
            f"Version {version} of {name!r} is not served; the deployed version is "
            f"{target.served.version}.",
        )
    return target


def model_metadata(target: PredictTarget) -> dict[str, Any]:
    served = target.served
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


def ready(platform: Any) -> bool:
    """Database answers and the key provider yields the key-encryption key (as /readyz)."""
    try:
        with platform.engine.connect() as conn:
            conn.execute(sql_text("SELECT 1"))
        platform.keyring.provider.check()
    except Exception:  # the database is away, or KeyProviderError
        return False
    return True


# ------------------------------------------------------------------ REST


def _error(refusal: Refusal) -> JSONResponse:
    # The protocol's error object is {"error": message}; 422 (a limit) is a 400 here.
    status = 400 if refusal.status == 422 else refusal.status
    return JSONResponse({"error": refusal.detail}, status, headers=refusal.headers)


def _service(request: Request) -> PredictService:
    service: PredictService = request.app.state.predict
    return service


def _credential(request: Request) -> str | None:
    return request_credential(request.scope)


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    ok = await run_in_threadpool(ready, request.app.state.platform)
    return JSONResponse({"ready": ok}, 200 if ok else 503)


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtext")
    except PackageNotFoundError:
        return "0.1.0"


async def _metadata(request: Request, name: str, version: str) -> Response:
    try:
        target = await resolve(_service(request), _credential(request), name, version)
    except Refusal as exc:
        return _error(exc)
    return JSONResponse(model_metadata(target))


async def _ready(request: Request, name: str, version: str) -> Response:
    try:
        await resolve(_service(request), _credential(request), name, version)
    except Refusal as exc:
        if exc.status == 409:  # the model exists but no version is deployed: not ready
            return JSONResponse({"name": name, "ready": False}, 400)
        return _error(exc)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}")
async def model_metadata_route(request: Request, name: str) -> Response:
    return await _metadata(request, name, "")


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return await _metadata(request, name, version)


@router.get("/models/{name}/ready")
async def model_ready(request: Request, name: str) -> Response:
    return await _ready(request, name, "")


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _ready(request, name, version)


@router.post("/models/{name}/infer")
async def model_infer(request: Request, name: str) -> Response:
    return await _infer(request, name, "")


@router.post("/models/{name}/versions/{version}/infer")
async def model_version_infer(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str) -> Response:
    try:
        service = _service(request)
        target = await resolve(service, _credential(request), name, version)
        try:
            body = await request.body()
        except HTTPException as exc:  # the streamed body passed the size limit: 413
            raise Refusal(exc.status_code, str(exc.detail)) from None
        header, raw = _split_body(body, request.headers.get(HEADER_LENGTH))
        texts, outputs = _parse_infer(header, raw)
        result = await infer(service, target, texts)
    except Refusal as exc:
        return _error(exc)
    return _infer_response(header.get("id"), result, outputs)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary tensor data after it."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise bad_tensor("Inference-Header-Content-Length should be an integer.") from None
        if not 0 < size <= len(body):
            raise bad_tensor(
                f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes."
            )
    try:
        header = json.loads(body[:size])
    except RecursionError:  # [[[[... : Python's parser recurses once per level
        raise bad_tensor("The inference request is nested too deeply.") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer past 4300 digits
        raise bad_tensor(f"The inference request is not valid JSON: {exc}.") from None
    if not isinstance(header, dict):
        raise bad_tensor("The inference request should be a JSON object.")
    return header, body[size:]


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    """A tensor's or the request's ``parameters``: an object, or absent."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_tensor(f'"parameters" of {what} should be a JSON object.')
    return params


def _parse_infer(header: dict[str, Any], raw: bytes) -> tuple[list[str], dict[str, bool]]:
    """The texts and the requested outputs (name -> as binary data?)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise bad_tensor('The inference request needs "inputs": a list of tensor objects.')
    single_input([str(t.get("name")) for t in inputs])
    tensor = inputs[0]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(_integer(d) for d in shape):
        raise bad_tensor(f'Input {INPUT!r} needs "shape": a list of integers.')
    params = _parameters(tensor, f"input {INPUT!r}")
    elements: list[bytes | str]
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not _integer(size) or size != len(raw):
            raise bad_tensor(
                f"Input {INPUT!r} declares binary_data_size {size}, "
                f"but {len(raw)} bytes follow the header."
            )
        elements = list(decode_bytes_elements(raw, f"Input {INPUT!r}"))
    else:
        if raw:
            raise bad_tensor(
                "Binary data follows the header but no input declares binary_data_size."
            )
        data = tensor.get("data")
        if not isinstance(data, list):
            raise bad_tensor(f'Input {INPUT!r} needs "data" (a list of strings) or binary data.')
        flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
        if not all(isinstance(x, str) for x in flat):
            raise bad_tensor(f"Input {INPUT!r} data should be strings (BYTES elements).")
        elements = list(flat)
    texts = texts_from_input(str(tensor.get("name")), str(tensor.get("datatype")), shape, elements)
    binary_default = bool(_parameters(header, "the request").get("binary_data_output", False))
    wanted = header.get("outputs") or []
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise bad_tensor('"outputs" should be a list of objects with a "name".')
    names = requested_outputs([str(o.get("name")) for o in wanted])
    by_name = {str(o.get("name")): o for o in wanted}
    outputs = {
        n: bool(_parameters(by_name.get(n, {}), f"output {n!r}").get("binary_data", binary_default))
        for n in names
    }
    return texts, outputs


def _infer_response(request_id: object, result: Inference, outputs: dict[str, bool]) -> Response:
    n, c = result.probabilities.shape
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs.items():
        if name == LABEL:
            items = result.labels_out()
            tensor: dict[str, Any] = {"name": LABEL, "datatype": "BYTES", "shape": [n]}
            if binary:
                blob = encode_bytes_elements(items)
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = [b.decode() for b in items]
        else:
            tensor = {"name": PROBABILITIES, "datatype": "FP32", "shape": [n, c]}
            if binary:
                blob = result.probabilities.astype("<f4").tobytes()
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = [float(x) for x in result.probabilities.reshape(-1)]
        tensors.append(tensor)
    body: dict[str, Any] = {
        "model_name": result.model,
        "model_version": str(result.version),
        "outputs": tensors,
    }
    if isinstance(request_id, str) and request_id:
        body["id"] = request_id
    head = json.dumps(body).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
