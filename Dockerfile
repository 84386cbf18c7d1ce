# dbt-backfill-operator image: one image, two entry points.
#
#   operator (default CMD):  dbt-backfill operator --all-namespaces
#   chunk Job:               python -m scripts.run_dbt_backfill --start-date D --end-date D ...
#                            (the operator sets the Job's command; cwd is /app)
#
# Build:  docker build -t dbt-backfill-operator:0.1.0 .
# No credentials are baked in: DATABASE_URL reaches the container from a Secret at run time.
# tests/unit/test_dockerfile.py checks the invariants noted below.

# ---------------------------------------------------------------------------------------------
# builder: resolve the pinned dependencies and build the project wheel into /opt/venv.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: they change far less often than the code.
COPY deploy/image/constraints.txt /src/constraints.txt
RUN pip install --requirement /src/constraints.txt

# The project itself: build a wheel (no editable install, no source tree in the image),
# install it without touching the pinned dependencies, and prove the set is consistent.
COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
RUN pip wheel --no-deps --wheel-dir /tmp/wheels /src \
    && pip install --no-deps /tmp/wheels/*.whl \
    && pip check \
    && dbt-backfill --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime: slim base + the venv + the dbt project (pre-parsed) + the documented scripts.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="dbt-backfill-operator" \
      org.opencontainers.image.description="Kubernetes operator and CLI that runs chunked, audited, tenant-safe dbt backfills on PostgreSQL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim"

# tini as PID 1: forwards SIGTERM to the process and reaps zombies (dbt may spawn children).
# The operator (kopf) handles SIGTERM itself, but a plain `python` as PID 1 would ignore it.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

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

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY dbt-package/ /app/dbt-package/
COPY analytics/ /app/analytics/
COPY scripts/ /app/scripts/

# Install the project's packages (analytics/packages.yml: the dbt_backfill package from
# ../dbt-package) and parse the dbt project once at build time, so dbt_packages/,
# target/manifest.json and target/partial_parse.msgpack ship in the image: the root filesystem
# is read-only at run time, and the runner seeds its emptyDir target path from the parse. The
# DBT_PG_* values are dummies for this RUN only (neither dbt deps nor dbt parse opens a
# connection; profiles.yml reads env_var() only) and are not kept in the image's ENV.
RUN DBT_PG_HOST=localhost DBT_PG_PORT=5432 DBT_PG_USER=dbt DBT_PG_DBNAME=analytics \
    DBT_TARGET_PATH=/app/analytics/target DBT_LOG_PATH=/tmp/dbt-build/logs \
    dbt deps --project-dir /app/analytics \
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
