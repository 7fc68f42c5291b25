#!/usr/bin/env bash
# Installs what `cargo xtask build-ebpf` needs to build the XDP program (gateway-ebpf):
# rust-src for the pinned nightly (for -Z build-std=core) and bpf-linker 0.13 linked
# against that nightly's own libLLVM (the LLVM that wrote the bitcode must read it back).
# Idempotent: a re-run takes well under a second. Adapted from the tested recipe
# shared/recipes/install-ebpf-toolchain.sh (the C fallback part is left out: the project
# builds the Rust program).
#
# The toolchain name is pinned in ONE place, gateway-ebpf/TOOLCHAIN ("nightly" = the
# image's nightly-2026-05-19, LLVM 22; a differently named toolchain cannot be downloaded
# here). If that toolchain is ever updated, its libLLVM file name changes, the symlink
# below dangles, `bpf-linker --version` fails, and this script rebuilds bpf-linker.
#
# Env knobs: BPF_LINKER_ROOT (cargo install --root, default $CARGO_HOME),
#            BPF_LLVM_SHIM   (dir whose lib/ holds the libLLVM symlinks).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
TC=$(tr -d '[:space:]' < "$here/gateway-ebpf/TOOLCHAIN")
CH=${CARGO_HOME:-$HOME/.cargo}
ROOT=${BPF_LINKER_ROOT:-$CH}
SHIM=${BPF_LLVM_SHIM:-$CH/bpf-linker-llvm}

if ! rustup toolchain list | grep -q "^${TC}-"; then
  echo "setup: the eBPF toolchain '$TC' (gateway-ebpf/TOOLCHAIN) is not installed;" \
       "install it with 'rustup toolchain install $TC --profile minimal'" >&2
  exit 1
fi

# 1. rust-src: bpfel-unknown-none ships no prebuilt core, so it is built from source.
if ! rustup component list --installed --toolchain "$TC" 2>/dev/null | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain "$TC"
fi

# 2. A prefix dir whose lib/ points at the toolchain's own libLLVM: lib/libLLVM.so for the
#    link (-lLLVM) and lib/<soname> for bpf-linker's RUNPATH at run time.
SYSROOT=$(rustc +"$TC" --print sysroot)
LIB=$(ls "$SYSROOT"/lib/libLLVM.so.* | head -n1)
MAJOR=$(rustc +"$TC" -vV | sed -n 's/^LLVM version: \([0-9]*\)\..*/\1/p')
mkdir -p "$SHIM/lib"
ln -sfn "$LIB" "$SHIM/lib/libLLVM.so"
ln -sfn "$LIB" "$SHIM/lib/$(basename "$LIB")"

# 3. bpf-linker 0.13 (features llvm-21/22/23), dynamically linked; skipped if it runs.
#    Plain `cargo install bpf-linker` would find Debian's llvm-config (LLVM 14) and fail.
if ! "$ROOT/bin/bpf-linker" --version >/dev/null 2>&1; then
  LLVM_PREFIX="$SHIM" cargo install bpf-linker@0.13.0 --locked --force \
    --no-default-features --features "llvm-$MAJOR" --root "$ROOT"
fi
"$ROOT/bin/bpf-linker" --version
