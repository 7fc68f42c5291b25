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

# The XDP program's toolchain (rust-src for the pinned nightly, bpf-linker): ~3 min the
# first time, under a second after that.
"$(dirname "$0")/install-ebpf-toolchain.sh"

# System tools the tests use: openssl (PKI cross-checks), ip (XDP tests' namespaces).
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  else
    echo "setup: please install: ${need[*]}" >&2
    exit 1
  fi
fi
