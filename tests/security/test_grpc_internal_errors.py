"""A server fault on gRPC is INTERNAL "Internal server error.", as on HTTP, never the
exception's own text. In a subprocess: the server's protocol modules and tritonclient's
(tests/serving/test_oip.py) cannot share one process."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import asyncio, grpc
from fedtext.server_thread import free_port
from serving.protocols.oip.grpc_server import start_grpc_server
from serving.protocols.oip.server import GrpcEndpoint
from serving.proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg

class Faulty:
    platform = None
    async def resolve(self, credential, name, version=""):
        raise RuntimeError("could not connect to postgresql://fedtext:hunter2@db/fedtext")

async def main():
    port = free_port()
    server = await start_grpc_server(Faulty(), GrpcEndpoint(port))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        try:
            await stub.ModelMetadata(
                pb.ModelMetadataRequest(name="m"), metadata=[("authorization", "Bearer k")]
            )
        except grpc.aio.AioRpcError as exc:
            print(exc.code().name)
            print(exc.details())
    await server.stop(0)

asyncio.run(main())
"""


def test_a_server_fault_is_internal_without_its_details() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    code, details = done.stdout.strip().splitlines()[-2:]
    assert code == "INTERNAL", done.stdout
    assert details == "Internal server error.", details
    assert "hunter2" not in done.stdout
