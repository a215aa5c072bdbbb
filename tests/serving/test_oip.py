"""The Open Inference Protocol on a real `fedtext serve`, called by Triton's own clients.

One server process (HTTP and gRPC ports) per module; the clients are ``tritonclient.http``
and ``tritonclient.grpc`` (and, for malformed requests a client library would refuse to
build, the raw stubs of Triton's copy of the protocol). Never import
serving.protocols.oip.grpc_server here: its generated messages and tritonclient's share
protobuf's default pool.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.server_thread import free_port
from fedtext.settings import Settings
from serving.config import ServingConfig
from serving.predict import PredictService
from serving.refusals import Refusal, grpc_code, unauthorized, v2_status
from serving.runtime.lookups import PredictLookups
from serving.runtime.model_cache import ModelCache
from tenancy.certificates import create_credentials
from tests.factories import TenantFixture, make_tenant, store_tiny_model

pytestmark = pytest.mark.slow

TEXTS = ["the flight was late again", "what a lovely crew, thank you", "gate 12 at noon"]
TOKEN = "operator-token-for-the-oip-tests-0123456789"


@dataclass
class Live:
    http: str  # host:port, as tritonclient takes it
    grpc: str
    acme: TenantFixture
    globex: TenantFixture

    def v1_predict(self, texts: list[str], key: str) -> dict[str, object]:
        r = httpx.post(
            f"http://{self.http}/v1/models/sentiment/predict",
            json={"inputs": texts, "top_k": 3},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body: dict[str, object] = r.json()
        return body


def bearer(key: str) -> dict[str, str]:
    # A new dict per call: tritonclient.http adds its own headers to the dict it is given.
    return {"authorization": f"Bearer {key}"}


def _serve(
    data: Path,
    http_port: int,
    grpc_port: int,
    *extra: str,
    scheme: str = "http",
    verify: object = True,
    env_extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`fedtext serve` on ``data``, once its /readyz answers."""
    env = {
        **os.environ,
        "FEDTEXT_DATA_DIR": str(data),
        "FEDTEXT_OPERATOR_TOKEN": TOKEN,
        "FEDTEXT_LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        **(env_extra or {}),
    }
    env.pop("FEDTEXT_DATABASE_URL", None)
    with (data / "serve.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtext.cli", "serve", "--host", "127.0.0.1",
             "--port", str(http_port), "--grpc-port", str(grpc_port), *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        try:
            url = f"{scheme}://127.0.0.1:{http_port}/readyz"
            if httpx.get(url, timeout=1, verify=verify).is_success:  # type: ignore[arg-type]
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"fedtext serve did not start:\n{(data / 'serve.log').read_text()}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("oip")
    platform = platform_from_settings(Settings(data_dir=data))
    upgrade_schema(platform)
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    store_tiny_model(platform, acme.tenant, name="sentiment", seed=1)
    store_tiny_model(platform, acme.tenant, name="draft", deploy=False)
    store_tiny_model(platform, globex.tenant, name="private", seed=2)
    platform.engine.dispose()
    http_port, grpc_port = free_port(), free_port()
    proc = _serve(data, http_port, grpc_port)
    try:
        yield Live(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", acme, globex)
    finally:
        _stop(proc)


def _by_label(v1: dict[str, object]) -> list[dict[str, float]]:
    rows = v1["predictions"]
    assert isinstance(rows, list)
    return [{p["label"]: p["score"] for p in row} for row in rows]


def _check_equal(
    labels: list[str], label_out: np.ndarray, probs: np.ndarray, v1: dict[str, object]
) -> None:
    expected = _by_label(v1)
    assert probs.dtype == np.float32 and probs.shape == (len(expected), len(labels))
    for row, want, label in zip(probs, expected, label_out.reshape(-1), strict=True):
        assert row.tolist() == pytest.approx([want[name] for name in labels], abs=1e-6)
        assert label.decode() == max(want, key=want.__getitem__)


# ------------------------------------------------------------------ REST


def test_tritonclient_http_round_trip_equals_the_v1_route(live: Live) -> None:
    client = httpclient.InferenceServerClient(url=live.http)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "fedtext"
    assert client.is_model_ready("sentiment", headers=bearer(live.acme.predict_key))
    meta = client.get_model_metadata("sentiment", headers=bearer(live.acme.predict_key))
    labels = json.loads(meta["properties"]["labels"])
    assert labels == ["negative", "neutral", "positive"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    v1 = live.v1_predict(TEXTS, live.acme.predict_key)
    # The client's defaults: binary tensor data both ways, shape [N].
    text = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = client.infer("sentiment", [text], headers=bearer(live.acme.predict_key))
    _check_equal(labels, result.as_numpy("label"), result.as_numpy("probabilities"), v1)
    # JSON tensors both ways, shape [N, 1], one output asked for by name.
    column = httpclient.InferInput("text", [len(TEXTS), 1], "BYTES")
    column.set_data_from_numpy(np.array([[t] for t in TEXTS], dtype=object), binary_data=False)
    probs_only = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(
        "sentiment", [column], outputs=probs_only, headers=bearer(live.acme.predict_key)
    )
    assert result.as_numpy("label") is None
    response = result.get_response()
    assert response["model_version"] == "1" and "data" in response["outputs"][0]
    label_out = np.array([max(r, key=r.__getitem__).encode() for r in _by_label(v1)])
    _check_equal(labels, label_out, result.as_numpy("probabilities"), v1)


def test_rest_refusals_speak_the_protocols_error_object(live: Live) -> None:
    url = f"http://{live.http}/v2/models"
    ok = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    acme = {"Authorization": f"Bearer {live.acme.predict_key}"}
    r = httpx.post(f"{url}/sentiment/infer", json=ok)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    other = httpx.post(f"{url}/private/infer", json=ok, headers=acme)
    missing = httpx.post(f"{url}/nosuch/infer", json=ok, headers=acme)
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"].replace("private", "X") == missing.json()["error"].replace(
        "nosuch", "X"
    )
    assert httpx.get(f"{url}/private", headers=acme).status_code == 404
    bad = [
        ({"inputs": [{**ok["inputs"][0], "datatype": "INT32"}]}, "datatype BYTES"),
        ({"inputs": [{**ok["inputs"][0], "name": "sentence"}]}, "Unknown input tensor"),
        ({"inputs": [{**ok["inputs"][0], "shape": [2, 2]}]}, "shape [N] or [N, 1]"),
        ({"inputs": [{**ok["inputs"][0], "shape": [3]}]}, "shape [3] but 1 elements"),
        ({"inputs": [{**ok["inputs"][0], "data": [" "]}]}, "is empty"),
        ({**ok, "outputs": [{"name": "logits"}]}, "Unknown output 'logits'"),
        ({"input": []}, '"inputs"'),
    ]
    for body, message in bad:
        r = httpx.post(f"{url}/sentiment/infer", json=body, headers=acme)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"], (body, r.text)
    # Binary data that lies about its size, is cut short, or is not UTF-8 text.
    for declared, raw, message in [
        (12, struct.pack("<I", 5) + b"abcde", "declares binary_data_size 12, but 9 bytes"),
        (9, struct.pack("<I", 9) + b"abcde", "truncated raw BYTES"),
        (9, struct.pack("<I", 5) + b"ab\xffcd", "element 0 is not valid UTF-8"),
    ]:
        tensor = {"name": "text", "datatype": "BYTES", "shape": [1]}
        header = json.dumps(
            {"inputs": [{**tensor, "parameters": {"binary_data_size": declared}}]}
        ).encode()
        r = httpx.post(
            f"{url}/sentiment/infer",
            content=header + raw,
            headers={**acme, "Inference-Header-Content-Length": str(len(header))},
        )
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert httpx.get(f"{url}/draft/ready", headers=acme).json()["ready"] is False
    v = httpx.get(f"{url}/sentiment/versions/7", headers=acme)
    assert v.status_code == 404 and "deployed version is 1" in v.json()["error"]


# ------------------------------------------------------------------ gRPC


def test_tritonclient_grpc_round_trip_equals_the_v1_route(live: Live) -> None:
    client = grpcclient.InferenceServerClient(url=live.grpc)
    auth = bearer(live.acme.predict_key)
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "fedtext" and server["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready("sentiment", headers=bearer(live.acme.predict_key))
    assert not client.is_model_ready("draft", headers=bearer(live.acme.predict_key))
    meta = client.get_model_metadata("sentiment", headers=auth, as_json=True)
    assert meta["versions"] == ["1"] and meta["platform"] == "pytorch"
    labels = ["negative", "neutral", "positive"]
    v1 = live.v1_predict(TEXTS, live.acme.predict_key)
    for shape, data in [
        ([len(TEXTS)], np.array([t.encode() for t in TEXTS], dtype=object)),
        ([len(TEXTS), 1], np.array([[t.encode()] for t in TEXTS], dtype=object)),
    ]:
        text = grpcclient.InferInput("text", shape, "BYTES")
        text.set_data_from_numpy(data)
        result = client.infer("sentiment", [text], headers=bearer(live.acme.predict_key))
        _check_equal(labels, result.as_numpy("label"), result.as_numpy("probabilities"), v1)
    client.close()


def _grpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_grpc_refuses_missing_and_bad_keys_and_hides_other_tenants_models(live: Live) -> None:
    client = grpcclient.InferenceServerClient(url=live.grpc)
    text = grpcclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"lovely crew"], dtype=object))
    for headers in [None, bearer("ft_not-a-key"), {"authorization": live.acme.predict_key}]:
        with pytest.raises(InferenceServerException) as info:
            client.infer("sentiment", [text], headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED", headers
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("sentiment", headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    # globex's own model answers globex, and is NOT_FOUND for acme exactly like a missing one.
    assert client.is_model_ready("private", headers=bearer(live.globex.predict_key))
    errors = {}
    for name in ("private", "nosuch"):
        with pytest.raises(InferenceServerException) as info:
            client.infer(name, [text], headers=bearer(live.acme.predict_key))
        errors[name] = info.value
        with pytest.raises(InferenceServerException) as meta:
            client.get_model_metadata(name, headers=bearer(live.acme.predict_key))
        assert meta.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as ready:
            client.is_model_ready(name, headers=bearer(live.acme.predict_key))
        assert ready.value.status() == "StatusCode.NOT_FOUND"
    assert errors["private"].status() == errors["nosuch"].status() == "StatusCode.NOT_FOUND"
    assert errors["private"].message().replace("private", "X") == errors[
        "nosuch"
    ].message().replace("nosuch", "X")
    # An admin key lacks nothing a predict key has; a key of the wrong scope would be 403.
    client.close()


def test_grpc_bad_tensors_are_invalid_argument_with_a_clear_message(live: Live) -> None:
    channel = grpc.insecure_channel(live.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    metadata = [("authorization", f"Bearer {live.acme.predict_key}")]

    def request(**tensor: object) -> service_pb2.ModelInferRequest:
        spec: dict[str, object] = {"name": "text", "datatype": "BYTES", "shape": [1], **tensor}
        contents = spec.pop("contents", [b"lovely crew"])
        req = service_pb2.ModelInferRequest(model_name="sentiment")
        t = req.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        t.contents.bytes_contents.extend(contents)  # type: ignore[arg-type]
        return req

    cases = [
        (request(datatype="FP32"), "datatype BYTES"),
        (request(name="sentence"), "Unknown input tensor 'sentence'"),
        (request(shape=[1, 2]), "shape [N] or [N, 1]"),
        (request(shape=[2]), "shape [2] but 1 elements"),
        (request(contents=[b"\xff\xfe"]), "not valid UTF-8"),
        (request(contents=[b"   "]), "is empty"),
        (request(contents=[b"x" * 2001]), "the limit is 2000"),
        (service_pb2.ModelInferRequest(model_name="sentiment"), "exactly one input tensor"),
    ]
    raw = request(contents=[])
    raw.raw_input_contents.append(struct.pack("<I", 40) + b"short")
    cases.append((raw, "truncated raw BYTES"))
    outputs = request()
    outputs.outputs.add(name="logits")
    cases.append((outputs, "Unknown output 'logits'"))
    for req, message in cases:
        error = _grpc_error(lambda req=req: stub.ModelInfer(req, metadata=metadata))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, error.details())
        assert message in (error.details() or ""), (message, error.details())
    # Without a key the tensors are not even looked at: UNAUTHENTICATED, not their error.
    error = _grpc_error(lambda: stub.ModelInfer(request(datatype="FP32")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # The same request, well formed, answers.
    ok = stub.ModelInfer(request(contents=[b"lovely crew"]), metadata=metadata)
    assert [o.name for o in ok.outputs] == ["label", "probabilities"]
    assert json.loads(ok.parameters["labels"].string_param) == ["negative", "neutral", "positive"]
    channel.close()


def test_grpc_refuses_repeated_authorization_and_long_names_stay_readable(live: Live) -> None:
    # As HTTP answers two Authorization headers 400: two authorization entries are
    # INVALID_ARGUMENT whichever comes first (before the review the first one won).
    channel = grpc.insecure_channel(live.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    good = ("authorization", f"Bearer {live.acme.predict_key}")
    request = service_pb2.ModelMetadataRequest(name="sentiment")
    for metadata in ([good, ("authorization", "Bearer forged")], [("authorization", "x"), good]):
        error = _grpc_error(
            lambda metadata=metadata: stub.ModelMetadata(request, metadata=metadata)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "one Authorization metadata entry" in (error.details() or "")
    assert stub.ModelMetadata(request, metadata=[good]).name == "sentiment"
    # A refusal that echoes a 20,000-character model name is cut short, so the client reads
    # NOT_FOUND (a status message past 16 KiB was dropped: the client saw RESOURCE_EXHAUSTED).
    long_name = service_pb2.ModelMetadataRequest(name="n" * 20_000)
    error = _grpc_error(lambda: stub.ModelMetadata(long_name, metadata=[good]))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert len(error.details() or "") <= 1000
    channel.close()


def test_grpc_speaks_tls_and_keeps_the_per_key_rate_limit(tmp_path: Path) -> None:
    made = create_credentials(tmp_path / "creds", hosts=["127.0.0.1"], tenants=[])
    cert, key, ca = made.layout.server_cert, made.layout.server_key, made.layout.ca_cert
    data = tmp_path / "data"
    platform = platform_from_settings(Settings(data_dir=data))
    upgrade_schema(platform)
    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant, name="sentiment")
    platform.engine.dispose()
    http_port, grpc_port = free_port(), free_port()
    tls = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    limit = {"FEDTEXT_RATE_LIMIT_PER_SECOND": "0.5", "FEDTEXT_RATE_LIMIT_BURST": "2"}
    proc = _serve(data, http_port, grpc_port, *tls, scheme="https", verify=str(ca), env_extra=limit)
    try:
        client = grpcclient.InferenceServerClient(
            url=f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(ca)
        )
        text = grpcclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"lovely crew"], dtype=object))
        result = client.infer("sentiment", [text], headers=bearer(acme.predict_key))
        assert result.as_numpy("probabilities").shape == (1, 3)
        # Burst 2 at 0.5/s: the second call passes, the third is refused as HTTP would (429).
        client.infer("sentiment", [text], headers=bearer(acme.predict_key))
        with pytest.raises(InferenceServerException) as limited:
            client.infer("sentiment", [text], headers=bearer(acme.predict_key))
        assert limited.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "Rate limit exceeded: 0.5 requests per second per key" in limited.value.message()
        client.close()
        plain = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException):  # no TLS, no answer
            plain.is_server_live(client_timeout=3)
        plain.close()
    finally:
        _stop(proc)


def test_a_grpc_port_asked_for_and_taken_stops_the_server_with_the_reason(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    upgrade_schema(platform_from_settings(Settings(data_dir=data)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "FEDTEXT_DATA_DIR": str(data), "FEDTEXT_OPERATOR_TOKEN": TOKEN}
        env.pop("FEDTEXT_DATABASE_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "fedtext.cli", "serve", "--host", "127.0.0.1",
             "--port", str(free_port()), "--grpc-port", str(port)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode != 0
    assert f"The gRPC port 127.0.0.1:{port} is not available" in done.stdout + done.stderr


# ------------------------------------------------------------------ one refusal, three adapters


def _refusal_of_inputs(texts: list[str]) -> Refusal:
    """What the predict service's own input check (the one every adapter runs) refuses."""
    service = PredictService(None, cast(ModelCache, None), PredictLookups(0), ServingConfig())
    with pytest.raises(Refusal) as info:
        service.check_inputs(texts)
    return info.value


@pytest.mark.parametrize("case", ["bad key", "unknown model", "empty input"])
def test_the_same_bad_input_gets_one_refusal_on_v1_v2_and_grpc(live: Live, case: str) -> None:
    """/v1 REST, /v2 REST and gRPC answer one refusal: its message as the predict service
    words it, its status as serving/refusals.py maps it (the one place for all three)."""
    key, model, text = live.acme.predict_key, "sentiment", "lovely crew"
    if case == "bad key":
        key = "ft_not-a-key"
    elif case == "unknown model":
        model = "nosuch"
    else:
        text = "   "
    auth = {"Authorization": f"Bearer {key}"}
    v1 = httpx.post(
        f"http://{live.http}/v1/models/{model}/predict", json={"inputs": [text]}, headers=auth
    )
    tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}
    v2 = httpx.post(
        f"http://{live.http}/v2/models/{model}/infer", json={"inputs": [tensor]}, headers=auth
    )
    channel = grpc.insecure_channel(live.grpc)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        text.encode()
    )
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    error = _grpc_error(
        lambda: stub.ModelInfer(request, metadata=[("authorization", auth["Authorization"])])
    )
    channel.close()

    if case == "bad key":
        expected = unauthorized()
    elif case == "unknown model":  # its message names the tenant: read back from /v1
        expected = Refusal(404, v1.json()["detail"])
    else:
        expected = _refusal_of_inputs([text])
    assert (v1.status_code, v1.json()["detail"]) == (expected.status, expected.detail)
    assert (v2.status_code, v2.json()["error"]) == (v2_status(expected), expected.detail)
    assert (error.code(), error.details()) == (grpc_code(expected), expected.detail)
    assert v1.status_code // 100 == v2.status_code // 100 == 4
    if case == "bad key":
        assert v1.headers["www-authenticate"] == v2.headers["www-authenticate"] == "Bearer"
