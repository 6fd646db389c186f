# The catalog service image; the same image runs `catalog migrate`, `catalog seed` and
# `python -m invalidator`. Runtime dependencies only, as an unprivileged user.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN python -m venv /opt/catalog && /opt/catalog/bin/pip install .

FROM python:3.11-slim
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
