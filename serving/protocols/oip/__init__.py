"""The Open Inference Protocol: its tensor codec, its /v2 REST routes and its gRPC server."""
