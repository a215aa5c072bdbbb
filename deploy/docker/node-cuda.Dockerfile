# A tenant node with an NVIDIA GPU: Flower SuperNode + the fedtext ClientApp on CUDA.
# The CUDA runtime comes with the torch wheel; the host needs the NVIDIA driver and the
# NVIDIA Container Toolkit (docker run --gpus all / a GPU resource limit in Kubernetes).
# Build from the repository root:
#   docker build -f deploy/docker/node-cuda.Dockerfile -t fedtext-node-cuda .
FROM python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1

RUN groupadd --system --gid 10001 fedtext \
    && useradd --system --uid 10001 --gid fedtext --create-home --home-dir /home/fedtext fedtext

WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY fedtext ./fedtext
COPY sdk ./sdk
COPY orchestration ./orchestration
COPY runs ./runs
COPY models ./models
COPY clients ./clients
COPY server ./server
COPY privacy ./privacy
COPY tenancy ./tenancy
COPY serving ./serving
RUN pip install .

USER fedtext
# The node's key and the CA are mounted read-only at /run/secrets/fedtext (node.key, ca.crt),
# the tenant's data read-only under /data. Set FEDTEXT_SUPERLINK (host:port),
# FEDTEXT_NODE_TENANT and FEDTEXT_NODE_DATA (the node checks the file before it starts).
ENV FEDTEXT_NODE_CREDENTIALS=/run/secrets/fedtext \
    FEDTEXT_NODE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
ENTRYPOINT ["fedtext", "federation", "node"]
