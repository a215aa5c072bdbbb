# The coordinator: Flower SuperLink (TLS, SuperNode authentication) + the fedtext API.
# Build from the repository root:  docker build -f deploy/docker/coordinator.Dockerfile -t fedtext-coordinator .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_HOME=/var/lib/fedtext/flwr \
    HF_HUB_OFFLINE=1 \
    FEDTEXT_DATA_DIR=/var/lib/fedtext

RUN groupadd --system --gid 10001 fedtext \
    && useradd --system --uid 10001 --gid fedtext --create-home --home-dir /home/fedtext fedtext

WORKDIR /app
# The CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
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
RUN pip install . \
    && mkdir -p /var/lib/fedtext /run/secrets/fedtext \
    && chown -R fedtext:fedtext /var/lib/fedtext

USER fedtext
VOLUME ["/var/lib/fedtext"]
# 9092: SuperLink (Fleet, Control and Runtime APIs, TLS); 8000: fedtext HTTP API.
EXPOSE 9092 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# Credentials are mounted read-only at /run/secrets/fedtext (server.crt, server.key, ca.crt);
# the database from FEDTEXT_DATABASE_URL; the operator token from FEDTEXT_OPERATOR_TOKEN.
ENTRYPOINT ["fedtext", "federation", "coordinator"]
CMD ["--ssl-certfile", "/run/secrets/fedtext/server.crt", \
     "--ssl-keyfile", "/run/secrets/fedtext/server.key", \
     "--ssl-ca-certfile", "/run/secrets/fedtext/ca.crt", \
     "--host", "0.0.0.0", "--port", "9092", "--api-host", "0.0.0.0", "--api-port", "8000"]
