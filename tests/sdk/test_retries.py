"""Which refusals the SDK repeats: 429 always, 503 only for calls safe to send twice, and
never sooner than the server's Retry-After (httpx's mock transport: no server needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from sdk import AsyncClient, Client, RateLimited, RetryPolicy, Unavailable

FAST = RetryPolicy(max_retries=2, backoff=0.0)
MODEL = {"name": "m", "version": 1, "deployed": True, "created_at": "2026-01-01T00:00:00"}


def _server(
    status: int, headers: dict[str, str] | None = None
) -> tuple[list[str], httpx.MockTransport]:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return httpx.Response(status, json={"detail": "busy"}, headers=headers)

    return seen, httpx.MockTransport(answer)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.create_key(["predict"]),
        lambda c: c.create_tenant("acme"),
        lambda c: c.create_run(["globex"]),
        lambda c: c.rollback("m"),
    ],
)
def test_a_503_of_a_call_that_changes_something_is_not_sent_again(
    call: Callable[[Client], object],
) -> None:
    seen, transport = _server(503)
    with (
        Client("http://api", "k", retry=FAST, transport=transport) as client,
        pytest.raises(Unavailable),
    ):
        call(client)
    assert len(seen) == 1, seen


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.list_models(),
        lambda c: c.predict("m", ["hi"]),
        lambda c: c.explain("m", ["hi"]),
        lambda c: c.deploy("m", 1),
        lambda c: c.revoke_key("k1"),
    ],
)
def test_a_503_of_a_call_safe_to_repeat_is_retried(call: Callable[[Client], object]) -> None:
    seen, transport = _server(503)
    with (
        Client("http://api", "k", retry=FAST, transport=transport) as client,
        pytest.raises(Unavailable),
    ):
        call(client)
    assert len(seen) == 3, seen


def test_429_is_retried_for_every_call_it_is_refused_before_any_work() -> None:
    seen, transport = _server(429, {"Retry-After": "0"})
    with (
        Client("http://api", "k", retry=FAST, transport=transport) as client,
        pytest.raises(RateLimited),
    ):
        client.create_key(["predict"])
    assert len(seen) == 3


def test_a_retry_after_longer_than_max_backoff_is_raised_not_cut_short() -> None:
    # Retrying after max_backoff when the server asked for longer only earns another 429.
    seen, transport = _server(429, {"Retry-After": "120"})
    retry = RetryPolicy(max_retries=3, max_backoff=30)
    client = Client("http://api", "k", retry=retry, transport=transport)
    with client, pytest.raises(RateLimited) as limited:
        client.predict("m", ["hi"])
    assert len(seen) == 1 and limited.value.retry_after == 120.0


def test_the_async_client_follows_the_same_rules() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        once, t1 = _server(503)
        again, t2 = _server(503)
        async with AsyncClient("http://api", "k", retry=FAST, transport=t1) as client:
            with pytest.raises(Unavailable):
                await client.create_run(["globex"])
        async with AsyncClient("http://api", "k", retry=FAST, transport=t2) as client:
            with pytest.raises(Unavailable):
                await client.list_runs()
        return once, again

    once, again = asyncio.run(scenario())
    assert (len(once), len(again)) == (1, 3)
