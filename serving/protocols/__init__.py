"""The serving protocols: /v1 REST (v1/), the Open Inference Protocol (oip/: codec, /v2 REST,
gRPC) and the web console, each a thin adapter over serving/predict.py."""
