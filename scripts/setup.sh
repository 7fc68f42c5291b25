#!/usr/bin/env bash
# Installs what building and testing devgate needs on a fresh machine of this kind
# (Debian 12, rustup stable). Idempotent; CI runs it before the tests (`cargo xtask ci`
# runs it first).
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

# System tools the tests use:
#   openssl          PKI cross-checks
#   ip (iproute2)    the XDP tests' network namespaces
#   systemd          systemd-analyze verify (unit file), and the service manager that
#                    tests/tests/ops_systemd.rs boots in a throwaway namespace
#   dpkg-deb         (dpkg, always present) inspecting the .deb
#   valgrind         instruction counts of the hot paths (`cargo xtask bench-check`)
#   nginx            the reverse-proxy baseline of `cargo xtask bench-report` (nginx-light:
#                    Debian's smallest build with TLS and proxying; its packaged service is
#                    not used, the report starts its own nginx on a loopback port)
#   tinyproxy        the HTTP CONNECT proxy that tests/tests/proxy.rs puts between the
#                    client library and the gateway, and tests/tests/remote_proxy.rs between
#                    devgate-agent/devgate-ctl and the gateway (its packaged service is not
#                    used: each test starts its own on a loopback port, as nobody when root)
#   useradd,         tests/tests/remote_pty_user.rs: a throwaway user and group for the
#   groupadd         agent's pty.user (package passwd; removed again by the test)
#   sshd, ssh, scp   tests/tests/remote.rs: a real OpenSSH session through `devgate-ctl forward`
#                    (the test starts its own sshd on a loopback port, not the packaged one)
#   tmux             tests/tests/remote.rs: `devgate-ctl shell` inside a real terminal
#   x11vnc, Xvfb,    tests/tests/remote.rs: screen shadowing, a VNC server on a virtual
#   vncsnapshot      display behind an agent and a VNC client through `devgate-ctl forward`
#   curl, python3    tests/tests/remote.rs: 100 parallel downloads from a device-local server
#   postgresql       the shared store of tests/tests/fleet.rs: each test makes its own
#                    cluster with initdb in a temp dir (the packaged cluster is not used)
#   haproxy          the balancer in front of three instances in tests/tests/fleet_haproxy.rs
#                    (TCP mode, PROXY v2); the test starts its own, the packaged service is
#                    not used
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v ip >/dev/null || need+=(iproute2)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v unshare >/dev/null || need+=(util-linux)
command -v nsenter >/dev/null || need+=(util-linux)
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx-light)
command -v tinyproxy >/dev/null || need+=(tinyproxy)
command -v useradd >/dev/null || need+=(passwd)
command -v groupadd >/dev/null || need+=(passwd)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v scp >/dev/null || need+=(openssh-client)
command -v tmux >/dev/null || need+=(tmux)
command -v x11vnc >/dev/null || need+=(x11vnc)
command -v Xvfb >/dev/null || need+=(xvfb)
command -v vncsnapshot >/dev/null || need+=(vncsnapshot)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v haproxy >/dev/null || need+=(haproxy)
updated=0
apt_update() {
  if [ "$updated" -eq 0 ]; then
    apt-get update -q
    updated=1
  fi
}
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
  else
    echo "setup: please install: ${need[*]}" >&2
    exit 1
  fi
fi

# promtool (checks /metrics, the example alert rules and scrape config). It ships in
# Debian's `prometheus` package, which would also install and enable a Prometheus server;
# only the promtool binary (static) is taken from that package.
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    apt_update
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # apt downloads as its sandbox user _apt when that user can write the directory.
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -q prometheus)
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    install -m 0755 "$tmp/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$tmp"
    trap - EXIT
    echo "setup: installed /usr/local/bin/promtool ($(promtool --version 2>&1 | head -n1))"
  else
    echo "setup: please install promtool (Debian package prometheus)" >&2
    exit 1
  fi
fi

# cargo-deb builds the Debian package (`cargo xtask deb`, tests/tests/ops_deb.rs).
# Pinned so that CI builds the same package every time; --locked uses its tested lockfile.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

# The kTLS VM test (tests/tests/ktls_vm.rs): this machine's kernel has no `tls` ULP, so the
# kernel-TLS path runs in QEMU (software emulation; KVM does not work here) on Debian's
# cloud kernel, which has CONFIG_TLS=m. Only extracted, never installed on the host.
KTLS_VM_DIR=/var/cache/devgate-ci/ktls-vm
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx poweroff || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
[ -x /sbin/depmod ] || need+=(kmod)
if [ "$(id -u)" -eq 0 ]; then
  if [ ${#need[@]} -gt 0 ]; then
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  if ! ls "$KTLS_VM_DIR"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    apt_update
    mkdir -p "$KTLS_VM_DIR"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true
    # The metapackage names the current cloud kernel; take that one.
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    (cd "$tmp" && apt-get download -q "$pkg")
    rm -rf "$KTLS_VM_DIR/kernel"
    dpkg-deb -x "$tmp"/linux-image-*.deb "$KTLS_VM_DIR/kernel"
    rm -rf "$tmp"
    echo "setup: extracted $pkg into $KTLS_VM_DIR/kernel for the kTLS VM test"
  fi
elif [ ${#need[@]} -gt 0 ] || ! ls "$KTLS_VM_DIR"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  echo "setup: the kTLS VM test needs root to install ${need[*]:-} and a Debian cloud kernel under $KTLS_VM_DIR; it skips without them" >&2
fi
