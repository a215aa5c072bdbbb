"""Load-run pieces for bench/serving.py (not a benchmark itself: `make bench` skips ``_*``).

``summary``: one closed-loop run's numbers, for HTTP and gRPC alike. The rest is the gRPC
load generator: Open Inference Protocol ``ModelInfer`` calls at a fixed concurrency.

The gRPC counterpart of bench/_serving_http_load.py's aiohttp load: one text per request, tenants'
keys round-robin (``authorization`` metadata), a fixed measured time after a warm-up, in
a process of its own. bench/_serving_lstm.py calls ``drive`` on the fedtext server it is
measuring, so HTTP and gRPC are reported from the same run and the same server.

    .venv/bin/python bench/_load.py 127.0.0.1:8081 KEY [KEY ...] --concurrency 64

prints one JSON object (the keys of bench/serving.py's runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "sentiment"
# Several HTTP/2 connections: one channel would carry all 64 streams on one socket and
# one client thread's framing, and measure that instead of the server.
CHANNELS = 4


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99 of ``latencies`` (seconds) in milliseconds (NaN when there are none)."""
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        if not ordered:
            return float("nan")
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {"p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


def summary(latencies: list[float], elapsed: float, done_inputs: int, errors: int,
            all_inputs: int, concurrency: int) -> dict[str, Any]:  # fmt: skip
    """A closed-loop run's numbers: ``latencies`` (s) and ``done_inputs`` of the measured
    window, ``all_inputs`` with the warm-up (to divide the server's CPU time by)."""
    return {
        "concurrency": concurrency,
        "rps": round(len(latencies) / elapsed, 1),
        "pps": round(done_inputs / elapsed, 1),
        **percentiles(latencies),
        "errors": errors,
        "requests": len(latencies) + errors,
        "all_inputs": all_inputs,
        "client_cpu_s": round(time.process_time(), 2),
    }


async def _drive(address: str, keys: list[str], texts: list[str], concurrency: int,
                 seconds: float, warmup: float) -> dict[str, Any]:  # fmt: skip
    import grpc

    from serving.proto import grpc_service_pb2 as pb
    from serving.proto import grpc_service_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    latencies: list[float] = []
    errors = 0
    all_inputs = 0

    def request(text: str) -> Any:
        req = pb.ModelInferRequest(model_name=MODEL)
        tensor = req.inputs.add(name="text", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(text.encode())
        return req

    t0 = time.perf_counter()
    measure_from, stop_at = t0 + warmup, t0 + warmup + seconds

    async def worker(w: int) -> None:
        nonlocal errors, all_inputs
        stub = stubs[w % len(stubs)]
        i = w
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            key = keys[i % len(keys)]
            text = texts[i % len(texts)]
            i += concurrency
            try:
                reply = await stub.ModelInfer(
                    request(text), metadata=(("authorization", f"Bearer {key}"),), timeout=60
                )
                ok = len(reply.raw_output_contents) == 2
            except grpc.aio.AioRpcError:
                ok = False
            end = time.perf_counter()
            all_inputs += 1 if ok else 0
            if start >= measure_from:
                if ok:
                    latencies.append(end - start)
                else:
                    errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = max(time.perf_counter(), stop_at) - measure_from
    for channel in channels:
        await channel.close()
    return summary(latencies, elapsed, len(latencies), errors, all_inputs, concurrency)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(tmp: Path, server_pid: int, address: str, keys: list[str], texts: list[str],
          concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:  # fmt: skip
    """One gRPC load run from its own process; adds the server's CPU ms per prediction."""
    spec = tmp / f"grpc-load-{concurrency}.json"
    spec.write_text(json.dumps({"address": address, "keys": keys, "texts": texts,
                                "concurrency": concurrency, "seconds": seconds,
                                "warmup": warmup}))  # fmt: skip
    cpu = _cpu_s(server_pid)
    out = subprocess.run(
        [sys.executable, __file__, "_spec", str(spec)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    used = _cpu_s(server_pid) - cpu
    run: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    run["server_cpu_ms_per_prediction"] = round(1000 * used / max(run.pop("all_inputs"), 1), 3)
    return run


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_spec":
        s = json.loads(Path(sys.argv[2]).read_text())
        result = asyncio.run(_drive(s["address"], s["keys"], s["texts"], s["concurrency"],
                                    s["seconds"], s["warmup"]))  # fmt: skip
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument("keys", nargs="+", help="predict keys (round-robin)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--text", action="append", help="texts to send (default: two)")
    args = parser.parse_args()
    texts = args.text or ["what a lovely crew, thank you", "my bag was lost and nobody helps"]
    result = asyncio.run(
        _drive(args.address, args.keys, texts, args.concurrency, args.seconds, args.warmup)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
