# syntax=docker/dockerfile:1
#
# fs-zammad: FreeSWITCH event socket -> Zammad CTI caller log.
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" -t fs-zammad .
#   docker run --rm --network host --env-file conf/fs-zammad.env -v fs-zammad-state:/var/lib/fs-zammad fs-zammad
#
# See conf/docker-compose.yml. The base image is pinned to a patch release; bump
# both FROM lines together (pinning the digest as well, @sha256:..., makes builds
# fully repeatable).

# --- builder: a self-contained virtualenv in /opt/venv -----------------------
FROM python:3.11.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
# Only what the package metadata needs (see .dockerignore). The same files are
# copied by .ci/dockerfile-check.sh.
COPY setup.cfg pyproject.toml README.md ./
COPY fs_zammad/ fs_zammad/

# MUST stay textually identical to INSTALL_CMD in .ci/dockerfile-check.sh, which
# replays it without Docker and fails if this line changes on its own.
# Dependencies come from setup.cfg (install_requires); pip, setuptools are then
# dropped from the venv: nothing needs them at run time.
RUN pip install --no-cache-dir . && pip check && pip uninstall --yes --quiet pip setuptools

# --- runtime: no compilers, no pip caches, no sources ------------------------
FROM python:3.11.11-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="fs-zammad" \
      org.opencontainers.image.description="Forwards FreeSWITCH calls to Zammad's CTI caller log, live and durably" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIR=/var/lib/fs-zammad \
    METRICS_PORT=9108 \
    METRICS_ADDRESS=0.0.0.0

# Fixed uid/gid so volume ownership and runAsUser policies are predictable.
# The state directory is created (and owned) before VOLUME: a new named volume
# starts as a copy of it, ownership included.
RUN groupadd --gid 10001 fs-zammad \
    && useradd --no-log-init --uid 10001 --gid fs-zammad \
        --home-dir /var/lib/fs-zammad --no-create-home --shell /usr/sbin/nologin fs-zammad \
    && install -d -o fs-zammad -g fs-zammad -m 0750 /var/lib/fs-zammad

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/fs-zammad
VOLUME ["/var/lib/fs-zammad"]

# /healthz and /metrics (METRICS_PORT).
EXPOSE 9108

# The service finishes in-flight requests on SIGTERM (SHUTDOWN_TIMEOUT, 10 s):
# give it a longer stop timeout than that (docker stop -t 20, stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["fs-zammad", "health"]

ENTRYPOINT ["fs-zammad"]
CMD ["run"]
