# The catalog service image; the same image runs `catalog migrate`, `catalog seed` and
# `python -m invalidator`. Runtime dependencies only, as an unprivileged user.
#
# The base is pinned by digest (the multi-architecture index of python:3.11.16-slim-bookworm on
# Docker Hub), so a rebuild gets the same bytes, not whatever the tag points at that day. To move
# to a newer patch release, look the digest up and replace both lines:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # the "Digest:" line
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Every dependency, the build backend included, at the version and hashes of requirements.lock
# (`make lock`); pip refuses anything unpinned or whose hash differs.
COPY requirements.lock .
RUN python -m venv /opt/catalog \
    && /opt/catalog/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY . .
RUN /opt/catalog/bin/pip install --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/catalog/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 catalog \
    && useradd --system --uid 10001 --gid catalog --no-create-home --shell /usr/sbin/nologin catalog
COPY --from=build /opt/catalog /opt/catalog
USER catalog:catalog
EXPOSE 50051 9464
# SERVING only when the service itself reports healthy dependencies (grpc.health.v1, service "").
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["catalog", "healthcheck"]
CMD ["catalog", "serve"]
