# syntax=docker/dockerfile:1
# One image for every Tayori service: `tayori <service>` runs one of them,
# `tayori migrate <service>` applies that service's migrations and exits.
#
#   make image                      # docker or podman, whichever runs here
#   docker run --rm -p 8081:8080 -e DATABASE_URL=... -e KAFKA_BOOTSTRAP=... tayori:dev contacts
#
# The base is pinned by digest, so a rebuild gets the same OS and Python: the digest of
# python:3.11-slim-bookworm as Docker Hub served it on 2026-08-24. To move to a newer one:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # the index digest
# and replace it in both FROM lines.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# --- build: the dependencies, then the project, into a virtualenv ----------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/venv
# The dependencies in a layer of their own: it is rebuilt only when pyproject.toml changes,
# not on every code change. Only [project] dependencies: not the `embedded` extra (the
# PostgreSQL and Kafka broker of `tayori dev` and the tests) nor `dev`.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /opt/venv/bin/pip install -r requirements.txt
# README.md* : pyproject.toml names README.md as the long description; the glob keeps
# the build working whether or not it exists yet.
COPY README.md* ./
COPY libs ./libs
COPY services ./services
COPY tayori ./tayori
RUN /opt/venv/bin/pip install --no-deps .

# --- runtime ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

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
