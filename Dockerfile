# syntax=docker/dockerfile:1
# One image for every Tayori service: `tayori <service>` runs one of them,
# `tayori migrate <service>` applies that service's migrations and exits.
#
#   docker build -t tayori:dev .
#   docker run --rm -p 8081:8080 -e DATABASE_URL=... -e KAFKA_BOOTSTRAP=... tayori:dev contacts

# --- build: install the project and its dependencies into a virtualenv ----------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/venv
# README.md* : pyproject.toml names README.md as the long description; the glob keeps
# the build working whether or not it exists yet.
COPY pyproject.toml README.md* ./
COPY libs ./libs
COPY services ./services
COPY tayori ./tayori
RUN /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install .

# --- runtime ------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TAYORI_SCHEMAS_DIR=/app/schemas/avro \
    HTTP_PORT=8080

# A fixed numeric UID/GID so Kubernetes `runAsNonRoot` can verify it. The exporter writes its
# files under /var/lib/tayori/exports (a volume in docker-compose, which copies this owner).
RUN groupadd --system --gid 10001 tayori \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin tayori \
 && mkdir -p /var/lib/tayori/exports \
 && chown 10001:10001 /var/lib/tayori/exports

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY schemas/avro /app/schemas/avro

USER 10001:10001
EXPOSE 8080

ENTRYPOINT ["tayori"]
CMD ["contacts"]
