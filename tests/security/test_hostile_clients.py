"""A real `fedtext serve`, probed over sockets as an attacker would (issue 16's findings).

One server process for the module: limits small enough to reach in a test (rate 5/s per
key, 3 failed authentications per address, 1 s to send a head or a body, 16 connections).
The failed-authentication test connects from other loopback addresses (127.0.0.2, .3) so
its empty failure bucket is not the other tests'.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.server_thread import free_port
from fedtext.settings import Settings
from tests.factories import TenantFixture, make_tenant, store_tiny_model

pytestmark = pytest.mark.slow

PREDICT = "/v1/models/lstm/predict"
HEADER_TIMEOUT = BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 16


@dataclass
class Served:
    url: str
    port: int
    pid: int
    operator: str
    acme: TenantFixture
    data: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("served") / "data"
    platform = platform_from_settings(Settings(data_dir=data))
    upgrade_schema(platform)
    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant)
    platform.engine.dispose()
    port, operator = free_port(), "op-" + secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "FEDTEXT_DATA_DIR": str(data),
        "FEDTEXT_OPERATOR_TOKEN": operator,
        "FEDTEXT_RATE_LIMIT_PER_SECOND": "5",
        "FEDTEXT_RATE_LIMIT_BURST": "5",
        "FEDTEXT_FAILED_AUTH_PER_SECOND": "0.5",
        "FEDTEXT_FAILED_AUTH_BURST": "3",
        "FEDTEXT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
        "FEDTEXT_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
        "FEDTEXT_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "FEDTEXT_SERVE_TORCH_THREADS": "1",
        "FEDTEXT_LOG_LEVEL": "WARNING",
    }
    env.pop("FEDTEXT_DATABASE_URL", None)
    log_path = data.parent / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtext.cli", "serve", "--port", str(port), "--grpc-port", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.umask(0),  # what it writes must be private all the same
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "fedtext serve did not become ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    try:
        yield Served(url, port, proc.pid, operator, acme, data)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _raw(port: int, request: bytes, *, read_timeout: float = 5.0) -> tuple[bytes, float]:
    """Send ``request`` on a new connection; (everything read until close, seconds taken)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        return _read_until_closed(sock, read_timeout), time.monotonic() - started


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def _status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _warm(served: Served) -> None:
    """Two predictions: the model is cached and the key memoized (the fast lane answers)."""
    for _ in range(2):
        r = httpx.post(served.url + PREDICT, json={"inputs": ["hi"]}, headers=served.acme.predict)
        assert r.status_code == 200, r.text


# -- finding 1: two Authorization headers, case variants of "Bearer"


def test_repeated_authorization_is_400_on_every_path(served: Served) -> None:
    _warm(served)
    key = served.acme.predict["Authorization"]
    twice = [("Authorization", key), ("Authorization", "Bearer forged")]
    codes = []
    with httpx.Client(base_url=served.url) as client:
        for _ in range(30):  # the probe's 30 at a limit of 5/s: none may pass
            r = client.post(PREDICT, json={"inputs": ["hi"]}, headers=twice)  # the fast lane
            codes.append(r.status_code)
        assert codes == [400] * 30
        assert "one Authorization header" in r.json()["detail"]
        for method, path in [("GET", "/healthz"), ("GET", "/v1/keys"), ("GET", "/metrics")]:
            r = client.request(method, path, headers=twice)
            assert r.status_code == 400 and "Authorization" in r.json()["detail"], path


def test_case_variants_of_bearer_share_one_bucket(served: Served) -> None:
    secret = served.acme.admin_key
    codes = []
    started = time.monotonic()
    with httpx.Client(base_url=served.url) as client:
        for i in range(15):
            scheme = ("Bearer", "bearer", "BEARER")[i % 3]
            r = client.get("/v1/keys", headers={"Authorization": f"{scheme} {secret}"})
            codes.append(r.status_code)
    elapsed = time.monotonic() - started
    assert set(codes) <= {200, 429}
    # One bucket: burst 5 plus what 5/s refilled meanwhile (three buckets would pass 15).
    assert codes.count(200) <= 5 + 5 * elapsed + 1, (codes, elapsed)
    assert 429 in codes


# -- finding 3: head size, slow heads and bodies, connections


def test_a_32_mib_header_is_431_and_not_buffered(served: Served) -> None:
    before = served.rss_kib()
    sent = 0
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 32 * 2**20:
                sock.sendall(b"a" * 2**16)
                sent += 2**16
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: the rest was never read
        raw = _read_until_closed(sock, 5)
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
    status, body = _status_and_body(raw)
    assert status == 431 and "16384 bytes" in str(body["detail"])
    assert sent < 32 * 2**20  # refused long before the end
    assert served.rss_kib() - before < 16 * 1024  # the probe saw +112 MiB for 2 x 64 MiB


def test_slow_headers_are_closed_within_the_timeout(served: Served) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.2)
        raw = b""
        while time.monotonic() - started < 10:  # one header byte every 0.1 s, forever
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            raw += chunk
            if not chunk:
                break
        elapsed = time.monotonic() - started
    assert elapsed < HEADER_TIMEOUT + 1.5, elapsed
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
    # A connection that sends nothing at all is closed as well (without a response).
    raw, elapsed = _raw(served.port, b"")
    assert elapsed < HEADER_TIMEOUT + 1.5 and raw == b""


def test_a_slow_body_is_closed_within_the_timeout(served: Served) -> None:
    head = (
        f"POST /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: {served.acme.admin['Authorization']}"
        "\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    raw, elapsed = _raw(served.port, head + b'{"scopes": ', read_timeout=10)
    assert elapsed < BODY_TIMEOUT + 1.5, elapsed
    status, body = _status_and_body(raw)
    assert status == 408 and "body" in str(body["detail"])


def test_connections_beyond_the_cap_get_503(served: Served) -> None:
    socks = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)  # accepted by the server (the head timeout is 1 s)
        raw, _ = _raw(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = _status_and_body(raw)
        assert status == 503 and f"{MAX_CONNECTIONS} connections" in str(body["detail"])
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert httpx.get(served.url + "/healthz").status_code == 200


# -- finding 4: what cannot be echoed or stored is a 4xx with a JSON body


def test_chunked_body_over_the_limit_on_the_fast_lane_is_413(served: Served) -> None:
    _warm(served)

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ["'
        for _ in range(24):
            yield b"y" * 65536  # 1.5 MiB, no Content-Length
        yield b'"]}'

    r = httpx.post(
        served.url + PREDICT,
        content=chunks(),
        headers={**served.acme.predict, "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "1048576 bytes" in r.json()["detail"]


def test_nan_overflow_and_surrogates_are_4xx_with_json(served: Served) -> None:
    admin = {**served.acme.admin, "Content-Type": "application/json"}
    predict = {**served.acme.predict, "Content-Type": "application/json"}
    cases = [
        ("POST", PREDICT, b'{"inputs": ["a"], "top_k": NaN}', predict),
        ("POST", PREDICT, b'{"inputs": ["a"], "top_k": 1e400}', predict),
        ("POST", PREDICT, b'{"inputs": ["\\ud800"]}', predict),
        ("POST", "/v1/privacy/budget", b'{"epsilon": NaN}', admin),
        ("GET", "/v1/models/lstm/versions/9223372036854775808", None, admin),
        ("POST", "/v1/models/lstm/versions/99999999999999999999/deploy", None, admin),
        ("POST", "/v1/keys", b'{"scopes": ["predict"], "name": "\\ud800"}', admin),
    ]
    with httpx.Client(base_url=served.url) as client:
        for method, path, body, headers in cases:
            time.sleep(0.25)  # within the key's 5/s
            r = client.request(method, path, content=body, headers=headers)
            assert r.status_code == 422, (path, body, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.json()["detail"], (path, body)
        r = client.post(PREDICT, content=b'{"inputs": ["ok", "\\ud800"]}', headers=predict)
        assert r.status_code == 422 and r.json()["detail"].startswith("inputs[1] ")


# -- finding 5: budgets, /metrics


def test_budgets_are_bounded_by_the_operator_setting(served: Served) -> None:
    time.sleep(1.2)
    admin = {**served.acme.admin, "Content-Type": "application/json"}
    operator = {"Authorization": f"Bearer {served.operator}", "Content-Type": "application/json"}
    with httpx.Client(base_url=served.url) as client:
        for raw in (b"1e308", b"Infinity", b"100.5"):
            r = client.post("/v1/privacy/budget", content=b'{"epsilon": %s}' % raw, headers=admin)
            assert r.status_code == 422, (raw, r.text)
            assert "bound of 100" in r.text or "finite" in r.text, r.text
        r = client.post(
            "/v1/tenants", json={"name": "initech", "budget_epsilon": 1e308}, headers=operator
        )
        assert r.status_code == 422 and "bound of 100" in r.json()["detail"]
        r = client.post("/v1/privacy/budget", json={"epsilon": 50}, headers=admin)
        assert r.status_code == 201
        assert client.get("/v1/privacy/budget", headers=admin).json()["budget_epsilon"] == 50


def test_metrics_need_the_operator_token(served: Served) -> None:
    time.sleep(0.6)  # the admin key's bucket (5/s) after the budget test
    assert httpx.get(served.url + "/metrics").status_code == 401
    assert httpx.get(served.url + "/metrics", headers=served.acme.admin).status_code == 401
    r = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {served.operator}"})
    assert r.status_code == 200 and "fedtext_http_requests_total" in r.text


# -- finding 1 again: failed authentication, per client address


def _from(address: str, served: Served) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127.x address is loopback)."""
    return httpx.Client(base_url=served.url, transport=httpx.HTTPTransport(local_address=address))


def test_failed_authentication_is_limited_per_address(served: Served) -> None:
    time.sleep(0.4)
    with _from("127.0.0.2", served) as client, _from("127.0.0.3", served) as other:
        assert client.get("/v1/keys", headers=served.acme.admin).status_code == 200
        codes = [
            client.get(
                "/v1/keys", headers={"Authorization": f"Bearer ftk_{secrets.token_hex(16)}"}
            ).status_code
            for _ in range(12)
        ]
        # 3 guesses (the burst), then refused before any database lookup.
        assert codes[:3] == [401, 401, 401] and set(codes[3:]) == {429}, codes
        r = client.get("/v1/keys", headers={"Authorization": "Bearer ftk_guess"})
        assert r.status_code == 429 and "failed authentications" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        # A key that has authenticated keeps its own limit while its address is blocked.
        assert client.get("/v1/keys", headers=served.acme.admin).status_code == 200
        # Another address has its own failures.
        r = other.get("/v1/keys", headers={"Authorization": "Bearer ftk_guess"})
        assert r.status_code == 401


def test_a_public_route_does_not_vouch_for_a_forged_token(served: Served) -> None:
    """A 200 from /healthz says nothing about the token it was sent with: guesses that
    alternate a public route and a protected one are still limited per address."""
    with _from("127.0.0.4", served) as client:
        codes = []
        for _ in range(8):
            forged = {"Authorization": f"Bearer ftk_{secrets.token_hex(16)}"}
            assert client.get("/healthz", headers=forged).status_code in (200, 429)
            codes.append(client.get("/v1/keys", headers=forged).status_code)
        assert codes[:3] == [401, 401, 401] and set(codes[3:]) == {429}, codes


# -- finding 5: file modes (the server was started under umask 000)


def test_what_the_server_wrote_is_private(served: Served) -> None:
    written = [served.data / "fedtext.db-wal", served.data / "fedtext.db-shm"]
    assert all(p.exists() for p in written)  # the server's own SQLite files
    wrong = {
        str(p.relative_to(served.data)): oct(p.stat().st_mode & 0o777)
        for p in [served.data, *served.data.rglob("*")]
        if p.stat().st_mode & 0o777 != (0o700 if p.is_dir() else 0o600)
    }
    assert not wrong, f"readable by others: {wrong}"


# -- finding 6: the development key provider is loud


def test_serve_warns_when_the_kek_file_is_in_the_data_directory(served: Served) -> None:
    log = (served.data.parent / "serve.log").read_text()
    assert "the key-encryption key is a file inside the data directory" in log
    assert "FEDTEXT_KEY_PROVIDER=pkcs11" in log
