"""X-Forwarded-For is believed only from configured proxies (issue 24, finding 10).

A real `fedtext serve` (the header handling lives in uvicorn), with a failed-authentication
limit of 3 per address and FEDTEXT_FORWARDED_ALLOW_IPS=127.0.0.2: a client on 127.0.0.1
that rotates X-Forwarded-For still spends its own address's bucket; the proxy on
127.0.0.2 has its clients' forwarded addresses counted, each on its own.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fedtext.server_thread import free_port

pytestmark = pytest.mark.slow

PROXY = "127.0.0.2"
BURST = 3


def _bad_key() -> dict[str, str]:
    return {"Authorization": f"Bearer ftk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("forwarded") / "data"
    port = free_port()
    env = {
        **os.environ,
        "FEDTEXT_DATA_DIR": str(data),
        "FEDTEXT_OPERATOR_TOKEN": "op-" + secrets.token_urlsafe(32),
        "FEDTEXT_FAILED_AUTH_PER_SECOND": "0.01",
        "FEDTEXT_FAILED_AUTH_BURST": str(BURST),
        "FEDTEXT_FORWARDED_ALLOW_IPS": PROXY,
        "FEDTEXT_SERVE_TORCH_THREADS": "1",
        "FEDTEXT_LOG_LEVEL": "WARNING",
    }
    env.pop("FEDTEXT_DATABASE_URL", None)
    env.pop("FORWARDED_ALLOW_IPS", None)  # uvicorn's own default must not decide either
    log_path = Path(str(data) + ".log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtext.cli", "serve", "--port", str(port), "--grpc-port", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "fedtext serve did not become ready"
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(url: str, source: str) -> httpx.Client:
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=source))


def test_rotating_forwarded_for_from_loopback_does_not_escape_the_limit(url: str) -> None:
    with _client(url, "127.0.0.1") as client:
        codes = [
            client.get(
                "/v1/keys", headers={**_bad_key(), "X-Forwarded-For": f"203.0.113.{i}"}
            ).status_code
            for i in range(1, 31)
        ]
    # The probe on old main: 30 x 401 (uvicorn trusted loopback's header by default).
    assert codes[:BURST] == [401] * BURST
    assert set(codes[BURST:]) == {429}, codes


def test_a_configured_proxys_forwarded_address_is_the_one_counted(url: str) -> None:
    with _client(url, PROXY) as proxy:

        def attempt(client_ip: str) -> int:
            headers = {**_bad_key(), "X-Forwarded-For": client_ip}
            return proxy.get("/v1/keys", headers=headers).status_code

        # Ten clients behind the proxy: each has its own bucket, none is limited.
        assert [attempt(f"198.51.100.{i}") for i in range(1, 11)] == [401] * 10
        # One client that keeps failing is limited, and only that one.
        codes = [attempt("198.51.100.77") for _ in range(BURST + 2)]
        assert codes == [401] * BURST + [429, 429]
        assert attempt("198.51.100.78") == 401
