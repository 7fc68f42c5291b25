#!/usr/bin/env bash
# Installs what building and testing devgate needs on a fresh machine of this kind
# (Debian 12, rustup stable). Idempotent; CI runs it before the tests.
set -euo pipefail

# Toolchain components used by `cargo xtask ci`.
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "$component"
  fi
done

# System tools the tests use: openssl (PKI cross-checks).
need=()
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  else
    echo "setup: please install: ${need[*]}" >&2
    exit 1
  fi
fi
