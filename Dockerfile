# syntax=docker/dockerfile:1
# metering-gateway as a container: docs/deployment.md tells how to build and run it.
# tests/test_container_layout.py parses this file and runs the same layout in a venv (CI has
# no Docker daemon), so keep the two in step.

# Builder: the project and its dependencies in a venv without pip; only the venv moves on.
FROM python:3.12-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir .

# Container config: the sample config with the ledger on the /data volume and every interface
# listened on; prices from the builtin database, with the sample table beside it for a config
# that pins or overrides with it. The build fails if a rewrite did not apply. check-config
# also compiles the price database into the cache folder, so a container's start reads it
# instead of importing genai-prices (docs/benchmarks.md, "Start-up").
FROM builder AS config
ENV GATEWAY_CACHE_DIR=/etc/metering-gateway/cache
COPY config/ config/
RUN mkdir -p /etc/metering-gateway \
 && cp config/pricing.yaml /etc/metering-gateway/pricing.yaml \
 && sed -e 's#^\( *sqlite_path:\).*#\1 /data/ledger.sqlite3#' \
        -e 's#host: 127\.0\.0\.1#host: 0.0.0.0#' \
        config/gateway.yaml > /etc/metering-gateway/gateway.yaml \
 && grep -qx ' *sqlite_path: /data/ledger.sqlite3' /etc/metering-gateway/gateway.yaml \
 && grep -qx 'pricing: {table: builtin, unknown_model: estimate}' /etc/metering-gateway/gateway.yaml \
 && /opt/venv/bin/metering-gateway check-config /etc/metering-gateway/gateway.yaml

FROM python:3.12-slim
LABEL org.opencontainers.image.title="metering-gateway" \
      org.opencontainers.image.description="Metering, limiting reverse proxy for the OpenAI API"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=config /etc/metering-gateway /etc/metering-gateway
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_CONFIG=/etc/metering-gateway/gateway.yaml \
    GATEWAY_CACHE_DIR=/etc/metering-gateway/cache
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8787
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=4)"]
ENTRYPOINT ["metering-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8787"]
