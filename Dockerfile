# maintenance-bridge container image.
#
# Build:  docker build -t maintenance-bridge .
# Run:    docker run -d --network host -e BRIDGE_TOPIC=projects/P/topics/T \
#           -v maintenance-bridge-state:/var/lib/maintenance-bridge maintenance-bridge
# Try:    docker run --rm maintenance-bridge demo
#
# --network host is what makes the metadata server reachable the way the bridge expects
# (docs/operations.md, "Why host networking"). scripts/container-check builds and runs this file
# with podman against a locally built base image.

# Pinned by tag; for byte-for-byte rebuilds pin the digest too (python:3.12-slim@sha256:...).
# The builder and the final stage must share this base: the venv's python links into it.
ARG BASE_IMAGE=python:3.12-slim
# checkov cannot see through the ARG in FROM, so it reads an untagged image; the default above is
# a tag, and an override (scripts/container-check) names its own.
# checkov:skip=CKV_DOCKER_7:FROM uses ARG BASE_IMAGE whose default is the tagged python:3.12-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, from the lock, wheels only (no compiler needed, or wanted): this layer is
# reused across source edits. The default install: Pub/Sub over REST, no gRPC (for
# --pubsub-transport grpc, also install deploy/constraints-grpc.txt's pins).
COPY deploy/constraints.txt ./deploy/constraints.txt
RUN /opt/venv/bin/pip install --only-binary=:all: --requirement deploy/constraints.txt
COPY . .
# --no-deps: everything is already there from the lock; `pip check` proves the lock satisfies the
# project. pip itself is then removed: the runtime image never installs anything.
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="maintenance-bridge" \
      org.opencontainers.image.description="Compute Engine maintenance notices to Pub/Sub as CloudEvents" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric ids so Kubernetes-style runAsNonRoot checks and host bind mounts (chown 10001) work
# without a passwd lookup. The state dir is created owned by that user before VOLUME, so a fresh
# named volume inherits the ownership.
RUN groupadd --gid 10001 bridge \
    && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin bridge \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/maintenance-bridge
COPY --from=builder /opt/venv /opt/venv
# JSON logs on stderr (Cloud Logging reads `severity`); /healthz on loopback only: with host
# networking 127.0.0.1 is the VM's loopback, so nothing is exposed. 8799 is chosen to be unlikely
# to clash with a workload on the same host network.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRIDGE_STATE_DIR=/var/lib/maintenance-bridge \
    BRIDGE_LOG_FORMAT=json \
    BRIDGE_HTTP_HOST=127.0.0.1 \
    BRIDGE_HTTP_PORT=8799
USER 10001:10001
WORKDIR /var/lib/maintenance-bridge
VOLUME ["/var/lib/maintenance-bridge"]
EXPOSE 8799
# No curl in slim images: the interpreter that is already there does the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BRIDGE_HTTP_PORT', '8799'), timeout=4)"]
ENTRYPOINT ["maintenance-bridge"]
CMD ["run"]
