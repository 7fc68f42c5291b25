#!/usr/bin/env bash
# Boots a throwaway systemd as PID 1 of new PID/mount/UTS/IPC/cgroup namespaces, on a
# copy-on-write overlay of this machine's root file system: everything it writes goes to a
# tmpfs and vanishes on stop. It shares the network with the machine (services it runs
# listen on the machine's loopback).
#
# tests/tests/ops_systemd.rs uses it to run the devgate package under a real service
# manager on machines whose PID 1 is not systemd (containers, CI VMs). Needs root,
# overlayfs and cgroups; /sys and /proc/sys are read-only inside, so systemd treats it as
# a container and leaves the machine's kernel settings, devices and clock alone.
#
#   systemd-sandbox.sh start DIR      boot; prints the host PID of the sandbox's systemd
#   systemd-sandbox.sh exec DIR CMD…  run CMD inside (its root, namespaces, cgroup)
#   systemd-sandbox.sh stop DIR       power off and clean up
# Files inside are reachable from the machine at /proc/<PID>/root/….
set -euo pipefail

usage() { echo "usage: $0 start|exec|stop DIR [CMD…]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2
shift 2

cgroup_dirs() {
  local name=$1
  if [ -d /sys/fs/cgroup/unified ]; then      # hybrid: name=systemd v1 + cgroup2
    echo "/sys/fs/cgroup/systemd/$name /sys/fs/cgroup/unified/$name"
  elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then   # pure cgroup2
    echo "/sys/fs/cgroup/$name"
  else
    echo "no usable cgroup hierarchy under /sys/fs/cgroup" >&2
    exit 1
  fi
}

sandbox_pid() { cat "$dir/pid"; }

in_sandbox() {
  nsenter -t "$(sandbox_pid)" -m -u -i -p -C -r -w "$@"
}

case $cmd in
start)
  [ "$(id -u)" -eq 0 ] || { echo "systemd-sandbox: needs root" >&2; exit 1; }
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || { echo "systemd-sandbox: no overlayfs" >&2; exit 1; }
  mkdir -p "$dir/ovl"
  name="devgate-sandbox-$$"
  echo "$name" >"$dir/cgroup"
  dirs=$(cgroup_dirs "$name")
  for d in $dirs; do mkdir -p "$d"; done

  cat >"$dir/inner.sh" <<'INNER'
#!/usr/bin/env bash
# PID 1 of the new namespaces until it execs systemd.
set -euo pipefail
d=$1
mount -t tmpfs -o mode=700 tmpfs "$d/ovl"
mkdir -p "$d/ovl/upper" "$d/ovl/work" "$d/ovl/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$d/ovl/upper,workdir=$d/ovl/work" "$d/ovl/root"
r=$d/ovl/root
mount --rbind /dev "$r/dev"
mount -t proc proc "$r/proc"
# Read-only kernel interfaces, as in any container: no sysctl, udev, binfmt changes
# leak to the machine.
mount --bind "$r/proc/sys" "$r/proc/sys"
mount -o remount,bind,ro "$r/proc/sys"
mount -t sysfs -o ro sysfs "$r/sys"
if [ -d /sys/fs/cgroup/unified ]; then
  mount -t tmpfs -o mode=755 tmpfs "$r/sys/fs/cgroup"
  mkdir -p "$r/sys/fs/cgroup/systemd" "$r/sys/fs/cgroup/unified"
  mount -t cgroup -o none,name=systemd cgroup "$r/sys/fs/cgroup/systemd"
  mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup/unified"
else
  mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
fi
mount -t tmpfs -o mode=755 tmpfs "$r/run"
# Boot into an empty target; units are started on demand by `exec … systemctl start`.
cat >"$r/etc/systemd/system/sandbox.target" <<'UNIT'
[Unit]
Description=Sandbox (scripts/systemd-sandbox.sh)
DefaultDependencies=no
UNIT
# Belt and braces: units that would touch the machine rather than the sandbox.
for u in systemd-sysctl.service systemd-binfmt.service systemd-modules-load.service \
         systemd-timesyncd.service systemd-udevd.service systemd-udev-trigger.service \
         systemd-networkd.service systemd-resolved.service swap.target \
         systemd-random-seed.service systemd-hwdb-update.service; do
  ln -sf /dev/null "$r/etc/systemd/system/$u"
done
hostname devgate-sandbox
export container=devgate-sandbox
exec chroot "$r" /lib/systemd/systemd --system --unit=sandbox.target --show-status=0 --log-level=notice
INNER
  chmod 755 "$dir/inner.sh"

  # Join the cgroup first: the cgroup namespace created by unshare is rooted there.
  join=""
  for d in $dirs; do join="$join echo \$\$ >$d/cgroup.procs;"; done
  setsid bash -c "$join exec unshare --fork --pid --mount --uts --ipc --cgroup --propagation private '$dir/inner.sh' '$dir'" \
    >"$dir/console.log" 2>&1 </dev/null &
  outer=$!
  pid=""
  for _ in $(seq 100); do
    pid=$(pgrep -P "$outer" || true)
    [ -n "$pid" ] && break
    sleep 0.05
  done
  [ -n "$pid" ] || { echo "systemd-sandbox: did not start; see $dir/console.log" >&2; cat "$dir/console.log" >&2; exit 1; }
  echo "$pid" >"$dir/pid"
  for _ in $(seq 200); do
    state=$(in_sandbox systemctl is-system-running 2>/dev/null || true)
    case $state in
      running|degraded) echo "$pid"; exit 0 ;;
    esac
    sleep 0.05
  done
  echo "systemd-sandbox: systemd did not come up (state: ${state:-none}); see $dir/console.log" >&2
  exit 1
  ;;
exec)
  in_sandbox "$@"
  ;;
stop)
  if [ -f "$dir/pid" ]; then
    pid=$(sandbox_pid)
    if kill -0 "$pid" 2>/dev/null; then
      in_sandbox systemctl poweroff --no-block >/dev/null 2>&1 || kill -s RTMIN+4 "$pid" 2>/dev/null || true
      for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      # PID 1 of the namespace: killing it kills everything inside.
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -f "$dir/pid"
  fi
  if [ -f "$dir/cgroup" ]; then
    # The groups empty only once the last process is reaped: retry for a while.
    for d in $(cgroup_dirs "$(cat "$dir/cgroup")"); do
      for _ in $(seq 100); do
        [ -d "$d" ] || break
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$d" ] && sleep 0.05
      done
    done
    rm -f "$dir/cgroup"
  fi
  ;;
*)
  usage
  ;;
esac
