"""The Open Inference Protocol over REST at /v2: an adapter over the predict service.

Both JSON tensors and Triton's binary tensor extension (``Inference-Header-Content-Length``:
a JSON header followed by raw tensor bytes, BYTES elements as 4-byte little-endian length
+ bytes) are read and written, so ``tritonclient.http`` works with its defaults. Tensors
are the codec's (codec.py), answers the predict service's ``rows`` (serving/predict.py),
refusals the protocol's error object (serving/refusals.py): another tenant's model is a
404 exactly like a missing one.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from serving.credentials import request_credential
from serving.predict import PredictService
from serving.protocols.oip.codec import (
    INPUT,
    LABEL,
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
from serving.protocols.oip.server import EXTENSIONS, SERVER_NAME, ready, server_version
from serving.refusals import Refusal, v2_response

HEADER_LENGTH = "inference-header-content-length"

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


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


async def _metadata(request: Request, name: str, version: str) -> Response:
    try:
        target = await _service(request).resolve(_credential(request), name, version)
    except Refusal as exc:
        return v2_response(exc)
    return JSONResponse(model_metadata(target.served))


async def _ready(request: Request, name: str, version: str) -> Response:
    try:
        await _service(request).resolve(_credential(request), name, version)
    except Refusal as exc:
        if exc.status == 409:  # the model exists but no version is deployed: not ready
            return JSONResponse({"name": name, "ready": False}, 400)
        return v2_response(exc)
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
        target = await service.resolve(_credential(request), name, version)
        try:
            body = await request.body()
        except HTTPException as exc:  # the streamed body passed the size limit: 413
            raise Refusal(exc.status_code, str(exc.detail)) from None
        header, raw = _split_body(body, request.headers.get(HEADER_LENGTH))
        texts, outputs = _parse_infer(header, raw)
        result = Inference.of(target.served, await service.rows(target, texts))
    except Refusal as exc:
        return v2_response(exc)
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
