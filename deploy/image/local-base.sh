#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim from Debian packages, for machines that reach no
# image registry (only the Debian mirror): debootstrap bookworm with Python 3.11, its venv
# module, pip, tini and CA certificates, then `podman import` it as $1.
#
# The result is cached twice: as the podman image itself (this script returns at once when it
# exists) and as a rootfs tarball under ~/.cache/dbt-backfill/ (a lost podman store is
# re-imported in seconds instead of re-bootstrapped in ~2 minutes).
#
# The mirror is the machine's own: the first bookworm URI in its apt sources (deb822 or
# one-line format), read at run time so no host is written down anywhere.
set -euo pipefail

name=${1:?usage: local-base.sh IMAGE_NAME}
cache=${DBT_BACKFILL_CACHE:-$HOME/.cache/dbt-backfill}/base-image
suite=bookworm
packages=python3.11,python3.11-venv,python3-pip,tini,ca-certificates
# The tarball's name changes whenever what goes into it does.
tarball="$cache/$suite-$(echo "$packages" | sha256sum | cut -c1-12).tar"

if podman image exists "$name"; then
  exit 0
fi

apt_mirror() {
  local file
  # deb822: "URIs:" and "Suites:" lines of one stanza (stanzas are blank-line separated).
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -r $file ]] || continue
    awk -v suite="$suite" '
      /^[[:space:]]*$/ { if (uri && hit) { print uri; exit } uri = ""; hit = 0; next }
      $1 == "URIs:" { uri = $2 }
      $1 == "Suites:" { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
      END { if (uri && hit) print uri }
    ' "$file" | head -n1
  done
  # One-line format: "deb [options] URI SUITE COMPONENTS".
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    sed -E 's/^deb[[:space:]]+\[[^]]*\]/deb/' | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
}

if [[ ! -s $tarball ]]; then
  command -v debootstrap >/dev/null || { echo "local-base: debootstrap is not installed" >&2; exit 2; }
  mirror=$(apt_mirror | grep -m1 -E '^(https?|file)://' || true)
  [[ -n $mirror ]] || { echo "local-base: no $suite mirror in /etc/apt/sources.list*" >&2; exit 2; }
  echo "local-base: no $name image here and no registry to pull python:3.11-slim from;"
  echo "local-base: building an equivalent base from Debian $suite packages (debootstrap, ~2 min)"
  mkdir -p "$cache"
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  # python:3.11-slim answers to `python`; Debian only installs python3.11.
  ln -sf python3.11 "$rootfs/usr/bin/python"
  # What a slim image leaves out: package lists, caches, docs, man pages, non-English locales.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'en*' ! -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" --numeric-owner -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
fi

echo "local-base: importing $tarball as $name"
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" "$name" >/dev/null
