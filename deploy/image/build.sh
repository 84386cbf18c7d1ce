#!/usr/bin/env bash
# `make image`: build the Dockerfile with podman into local storage as $IMAGE.
#
# The base is the Dockerfile's pinned python:3.11-slim-bookworm when this machine has it; no
# registry is reachable here, so otherwise an equivalent base is built from Debian packages
# (local-base.sh, cached) and passed as BASE_IMAGE. podman's layer cache makes a rebuild with
# unchanged inputs take seconds, and a code-only change rebuild only the project layers.
set -euo pipefail
cd "$(dirname "$0")/../.."

image=${IMAGE:-localhost/dbt-backfill-operator:dev}
local_base=${LOCAL_BASE_IMAGE:-localhost/dbt-backfill-base:python3.11-bookworm}
ca=/etc/ssl/certs/ca-certificates.crt

command -v podman >/dev/null || { echo "image: podman is not installed (.ci/run installs it)" >&2; exit 2; }
deploy/image/podman-setup.sh

pinned=$(sed -n -E 's/^ARG BASE_IMAGE=(.+)$/\1/p' Dockerfile | head -n1)
[[ -n $pinned ]] || { echo "image: the Dockerfile has no ARG BASE_IMAGE default" >&2; exit 2; }
base_args=()
base=$pinned
if podman image exists "$pinned"; then
  echo "image: base $pinned"
else
  echo "image: $pinned is not in local storage and no registry is reachable;"
  echo "image: using the equivalent Debian bookworm base $local_base instead"
  deploy/image/local-base.sh "$local_base"
  base=$local_base
  base_args=(--build-arg "BASE_IMAGE=$local_base")
fi

# What the build reads, hashed: an image labelled with the same hash is already this build,
# so a warm `make image` (every `make test`) returns at once instead of re-checking each layer.
context_hash() {
  {
    podman image inspect --format '{{.Id}}' "$base"
    echo "parse=${PARSE_DATABASE:-}/${PARSE_SCHEMA:-}"
    find Dockerfile .dockerignore pyproject.toml README.md deploy/image/constraints.txt operator analytics scripts \
      \( -name __pycache__ -o -name '*.egg-info' -o -path analytics/target -o -path analytics/logs \
      -o -path analytics/dbt_packages \) -prune -o -type f -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}
context=$(context_hash)
label=io.dbt-backfill.build-context
if [[ $(podman image inspect --format "{{index .Labels \"$label\"}}" "$image" 2>/dev/null || true) == "$context" ]]; then
  echo "image: $image is up to date (build context $context)"
  exit 0
fi

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
mounts=()
# TLS inside the build (pip) trusts what this machine trusts.
[[ -r $ca ]] && mounts=(-v "$ca:$ca:ro")
podman build --pull=never --network host "${mounts[@]}" "${base_args[@]}" \
  --build-arg "VERSION=$version" \
  ${PARSE_DATABASE:+--build-arg "PARSE_DATABASE=$PARSE_DATABASE"} ${PARSE_SCHEMA:+--build-arg "PARSE_SCHEMA=$PARSE_SCHEMA"} \
  --label "$label=$context" --layers --tag "$image" --file Dockerfile .
echo "image: built $image ($(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
