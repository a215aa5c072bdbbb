"""Tenant-isolated serving: protocols/ (v1 REST, Open Inference Protocol REST and gRPC,
console) over one predict service (predict.py) over runtime/ (model cache, batching,
shared encoder); refusals mapped to HTTP and gRPC statuses in refusals.py only."""
