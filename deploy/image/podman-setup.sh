#!/usr/bin/env bash
# Make podman usable on this kind of machine, idempotently and without touching other settings:
# runc here refuses podman's default rlimits (`error setting rlimit type 7`, then type 6) because
# they exceed the machine's hard limits, so the container defaults are capped at 1024.
#
# Edits only `default_ulimits` under [containers] in $CONTAINERS_CONF (default
# /etc/containers/containers.conf): adds the section or the key when missing, and leaves a
# key that is already set alone (whoever set it knew this machine).
set -euo pipefail

conf=${CONTAINERS_CONF:-/etc/containers/containers.conf}
setting='default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]'

command -v podman >/dev/null || { echo "podman-setup: podman is not installed" >&2; exit 2; }

# The keys under [containers], as TOML sees them (comments and other tables do not count).
has_key() {
  [[ -f $conf ]] && python3 -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    sys.exit(0 if "default_ulimits" in tomllib.load(f).get("containers", {}) else 1)
' "$conf"
}

if has_key; then
  exit 0
fi

mkdir -p "$(dirname "$conf")"
touch "$conf"
if grep -qE '^[[:space:]]*\[containers\][[:space:]]*(#.*)?$' "$conf"; then
  # Insert right after the table header, keeping everything else as it is.
  tmp=$(mktemp "$conf.XXXXXX")
  awk -v line="$setting" '{ print } !done && /^[[:space:]]*\[containers\][[:space:]]*(#.*)?$/ { print line; done = 1 }' \
    "$conf" >"$tmp"
  chmod --reference="$conf" "$tmp"
  mv "$tmp" "$conf"
else
  printf '\n[containers]\n%s\n' "$setting" >>"$conf"
fi
has_key || { echo "podman-setup: could not set default_ulimits in $conf" >&2; exit 1; }
echo "podman-setup: set $setting in $conf"
