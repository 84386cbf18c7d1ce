#!/usr/bin/env bash
# Builds the pinned control plane from the Go module proxy into a per-version cache outside the
# repo, and builds only what is missing there. Prints the cache directory last.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/go.mod")"
cache="${DBT_BACKFILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dbt-backfill}/k8s/$version"
mkdir -p "$cache"

minor="${version#v1.}"; minor="${minor%%.*}"
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
ldflags="$ldflags -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"

declare -A pkgs=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
)
cd "$here"
for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  if [[ -x "$cache/$name" ]]; then
    continue
  fi
  echo "cluster-bin: building $name $version (cold builds take minutes; cached in $cache)" >&2
  start=$SECONDS
  CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$cache/$name.partial" "${pkgs[$name]}"
  mv "$cache/$name.partial" "$cache/$name"
  echo "cluster-bin: built $name in $((SECONDS - start)) s" >&2
done
echo "$cache"
