# dbt-backfill-operator image: one image, two entry points.
#
#   operator (default CMD):  dbt-backfill operator --all-namespaces
#   chunk Job:               python -m scripts.run_dbt_backfill --start-date D --end-date D ...
#                            (the operator sets the Job's command; cwd is /app)
#
# Build:  make image   (podman build; see deploy/image/build.sh)
# The base is a build argument, python:3.11-slim-bookworm pinned by digest. A machine that
# reaches no registry builds an equivalent base from Debian bookworm packages instead
# (deploy/image/local-base.sh) and passes it as BASE_IMAGE.
# No credentials are baked in: DATABASE_URL reaches the container from a Secret at run time.
# tests/unit/test_dockerfile.py checks the invariants noted below; tests/image/ builds and runs it.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# ---------------------------------------------------------------------------------------------
# deps: the pinned, hash-checked dependency closure in /opt/venv. Its inputs are the base and
# constraints.txt only, so a code change never reinstalls (or re-copies) it.
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS deps

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Every wheel is checked against the hashes pip-compile recorded (make constraints). The file
# is the whole closure, so --no-deps installs exactly it (and spares old pips their trouble
# with extras in hash mode); `pip check` below proves nothing is missing. The cache mount keeps
# downloads between builds without putting them in a layer.
COPY deploy/image/constraints.txt /src/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps --only-binary=:all: --requirement /src/constraints.txt

# ---------------------------------------------------------------------------------------------
# builder: the project wheel, built without network (setuptools and wheel are pinned above)
# and installed over the pinned set without touching it; `pip check` proves it consistent.
# ---------------------------------------------------------------------------------------------
FROM deps AS builder

COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels /src \
    && pip install --no-deps --no-index /tmp/wheels/*.whl \
    && pip check \
    && dbt-backfill --version

# ---------------------------------------------------------------------------------------------
# runtime: slim base + the venv + the dbt project (pre-parsed) + the documented scripts.
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG BASE_IMAGE
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="dbt-backfill-operator" \
      org.opencontainers.image.description="Kubernetes operator and CLI that runs chunked, audited, tenant-safe dbt backfills on PostgreSQL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# tini as PID 1: forwards SIGTERM to the process and reaps zombies (dbt may spawn children).
# The operator (kopf) handles SIGTERM itself, but a plain `python` as PID 1 would ignore it.
# (The local Debian base already has it.)
RUN test -x /usr/bin/tini || { apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*; }

# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 dbt \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin dbt

# The runtime root filesystem is read-only in Kubernetes: everything dbt writes goes under
# /tmp, which the Deployment and the chunk Jobs mount as an emptyDir.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    DBT_PROJECT_DIR=/app/analytics \
    DBT_PROFILES_DIR=/app/analytics \
    DBT_TARGET_PATH=/tmp/dbt/target \
    DBT_LOG_PATH=/tmp/dbt/logs \
    DBT_SEND_ANONYMOUS_USAGE_STATS=false \
    DO_NOT_TRACK=1

# The dependencies as one layer that only constraints.txt changes; then the project wheel
# (a few hundred KiB) on top, so a code change rebuilds only that.
COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /tmp/wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

WORKDIR /app
COPY dbt-package/ /app/dbt-package/
COPY analytics/ /app/analytics/
COPY scripts/ /app/scripts/

# Install the project's packages (analytics/packages.yml: the dbt_backfill package from
# ../dbt-package) and parse the dbt project once at build time, so dbt_packages/,
# target/manifest.json and target/partial_parse.msgpack ship in the image (the root filesystem
# is read-only at run time; the runner seeds its emptyDir target path from the parse). Host,
# port and user are the placeholders every later parse uses too (operator/dbtbackfill/runner/parse_key.py),
# so a Pod reuses this parse whatever its credentials, as long as its database and schema are
# these two (build with --build-arg to match yours; another database only costs the Pod a full
# parse). Nothing here is kept in the image's ENV; neither dbt deps nor dbt parse connects.
ARG PARSE_DATABASE=analytics
ARG PARSE_SCHEMA=analytics
RUN export DBT_PG_HOST=localhost DBT_PG_PORT=5432 DBT_PG_USER=dbt \
    DBT_PG_DBNAME=${PARSE_DATABASE} DBT_PG_SCHEMA=${PARSE_SCHEMA} \
    DBT_TARGET_PATH=/app/analytics/target DBT_LOG_PATH=/tmp/dbt-build/logs \
    && dbt deps --project-dir /app/analytics \
    && test -f /app/analytics/dbt_packages/dbt_backfill/macros/backfill.sql \
    && dbt parse --project-dir /app/analytics --profiles-dir /app/analytics \
    && test -s /app/analytics/target/manifest.json \
    && test -s /app/analytics/target/partial_parse.msgpack \
    && python -m compileall -q /app/scripts \
    && rm -rf /tmp/dbt-build /tmp/.dbt /app/analytics/logs

# Everything above is owned by root: the runtime user can read it but not change it.
USER 10001:10001

# 8080: kopf liveness endpoint (/healthz); 9102: Prometheus metrics (/metrics).
EXPOSE 8080 9102

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dbt-backfill", "operator", "--all-namespaces"]
