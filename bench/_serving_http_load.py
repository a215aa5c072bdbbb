"""bench/serving.py's HTTP load generator (aiohttp), run in a process of its own.

Closed loop at a fixed concurrency, open loop at a fixed rate, or one request per key
(``touch``). ``python bench/_serving_http_load.py SPEC.json`` prints one JSON object. Not a
benchmark itself (``make bench`` skips ``_*``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._load import percentiles, summary  # noqa: E402


async def _drive(url: str, keys: list[str], texts: list[str], concurrency: int, seconds: float,
                 warmup: float, per_request: int) -> dict[str, Any]:  # fmt: skip
    # aiohttp, not httpx: httpx's connection pool spent ~9 ms of client CPU per request at
    # 64 connections here, so the load generator, not the server, set the ceiling.
    import aiohttp

    latencies: list[float] = []
    errors = 0
    done_inputs = 0
    all_inputs = 0  # warm-up included, to divide the server's CPU time by
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter()
        measure_from, stop_at = t0 + warmup, t0 + warmup + seconds

        async def worker(w: int) -> None:
            nonlocal errors, done_inputs, all_inputs
            i = w
            while True:
                start = time.perf_counter()
                if start >= stop_at:
                    return
                key = keys[i % len(keys)]
                inputs = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                i += concurrency
                ok = False
                try:
                    async with client.post(
                        "/v1/models/sentiment/predict",
                        json={"inputs": inputs, "top_k": 1},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        body = await r.json()
                        ok = r.status == 200 and len(body["predictions"]) == per_request
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    ok = False
                end = time.perf_counter()
                all_inputs += per_request if ok else 0
                if start >= measure_from:
                    if ok:
                        latencies.append(end - start)
                        done_inputs += per_request
                    else:
                        errors += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = max(time.perf_counter(), stop_at) - measure_from
    return summary(latencies, elapsed, done_inputs, errors, all_inputs, concurrency)


async def _drive_open(url: str, keys: list[str], texts: list[str], rate: float, seconds: float,
                      warmup: float) -> dict[str, Any]:  # fmt: skip
    """Open loop (MLPerf's server scenario): request i is sent at t0 + i / rate, whatever
    the earlier ones are doing; latency counts from that scheduled time."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter() + 0.1
        total = int((warmup + seconds) * rate)
        measured_from = int(warmup * rate)

        async def one(i: int) -> None:
            nonlocal errors
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            ok = False
            try:
                async with client.post(
                    "/v1/models/sentiment/predict",
                    json={"inputs": [texts[i % len(texts)]], "top_k": 1},
                    headers={"Authorization": f"Bearer {keys[i % len(keys)]}"},
                ) as r:
                    body = await r.json()
                    ok = r.status == 200 and len(body["predictions"]) == 1
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                ok = False
            if i >= measured_from:
                if ok:
                    latencies.append(time.perf_counter() - due)
                else:
                    errors += 1

        await asyncio.gather(*(one(i) for i in range(total)))
    return {"rate": round(rate, 1), "requests": len(latencies) + errors, "errors": errors,
            **percentiles(latencies)}  # fmt: skip


async def _touch(url: str, keys: list[str], texts: list[str], concurrency: int) -> dict[str, Any]:
    """One request per key (each tenant's model loaded once), ``concurrency`` at a time."""
    import aiohttp

    errors = 0
    queue = list(enumerate(keys))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal errors
            while queue:
                i, key = queue.pop()
                try:
                    async with client.post(
                        "/v1/models/sentiment/predict",
                        json={"inputs": [texts[i % len(texts)]], "top_k": 1},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        await r.read()
                        errors += r.status != 200
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests": len(keys), "errors": errors,
            "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def load_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mode = spec.get("mode", "closed")
    if mode == "open":
        coro = _drive_open(spec["url"], spec["keys"], spec["texts"], spec["rate"],
                           spec["seconds"], spec["warmup"])  # fmt: skip
    elif mode == "touch":
        coro = _touch(spec["url"], spec["keys"], spec["texts"], spec["concurrency"])
    else:
        coro = _drive(spec["url"], spec["keys"], spec["texts"], spec["concurrency"],
                      spec["seconds"], spec["warmup"], spec["per_request"])  # fmt: skip
    print(json.dumps(asyncio.run(coro)))


def drive(tmp: Path, url: str, keys: list[str], texts: list[str], concurrency: int,
          seconds: float, warmup: float, per_request: int = 1) -> dict[str, Any]:  # fmt: skip
    """Run the load generator in its own process and return its numbers."""
    return run_load(tmp, {
        "url": url, "keys": keys, "texts": texts, "concurrency": concurrency,
        "seconds": seconds, "warmup": warmup, "per_request": per_request,
    })  # fmt: skip


def touch(tmp: Path, url: str, keys: list[str], texts: list[str],
          concurrency: int = 16) -> dict[str, Any]:  # fmt: skip
    """One request per key from the load process (loads each tenant's model once)."""
    return run_load(tmp, {"mode": "touch", "url": url, "keys": keys, "texts": texts,
                       "concurrency": concurrency})  # fmt: skip


def run_load(tmp: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The load generator in its own process on ``spec``; its JSON line."""
    spec_path = tmp / f"load-{spec.get('mode', 'closed')}.json"
    spec_path.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, __file__, str(spec_path)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- shared encoder


if __name__ == "__main__":
    load_main(sys.argv[1])
