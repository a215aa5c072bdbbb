# A tenant node (CPU): Flower SuperNode + the fedtext ClientApp. No database, no platform keys.
# Build from the repository root:  docker build -f deploy/docker/node.Dockerfile -t fedtext-node .
FROM python:3.11-slim-bookworm

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
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
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
# FEDTEXT_NODE_TENANT and FEDTEXT_NODE_DATA; FEDTEXT_NODE_DEVICE defaults to auto (CPU here).
ENV FEDTEXT_NODE_CREDENTIALS=/run/secrets/fedtext
ENTRYPOINT ["fedtext", "federation", "node"]
