//! The service manager notification protocol (`sd_notify(3)`), implemented directly.
//!
//! A service started with `Type=notify` finds a datagram socket in `$NOTIFY_SOCKET` (a
//! path, or an abstract name written `@name`) and sends newline-separated `KEY=VALUE`
//! assignments to it: `READY=1` once it serves, `WATCHDOG=1` periodically while
//! `$WATCHDOG_USEC` asks for it, `RELOADING=1`/`READY=1` around a reload and `STOPPING=1`
//! when it begins to shut down. The protocol is a single `sendto` per message, so a crate
//! (and its libsystemd dependency) is not worth it.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every call is a no-op.
//! Errors are logged once and otherwise ignored: a service manager that stops listening
//! must not take the gateway down.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where notifications go and what the service manager asked for.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Builds a notifier from the values of `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
    /// `WATCHDOG_PID` (pass `None` for unset variables); `None` without a socket.
    ///
    /// The watchdog is only ours if `WATCHDOG_PID` is unset or names this process: a
    /// child that inherited the environment must not ping on its parent's behalf.
    pub fn from_vars(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> io::Result<Option<Self>> {
        let Some(name) = notify_socket.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let target = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={name:?} is neither a path nor an abstract name"),
                ));
            }
        };
        let ours = watchdog_pid
            .map(str::trim)
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = watchdog_usec
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|us| *us > 0 && ours)
            .map(Duration::from_micros);
        Ok(Some(Self {
            socket: UnixDatagram::unbound()?,
            target,
            watchdog,
        }))
    }

    /// Sends one message (newline-separated assignments).
    pub fn send(&self, state: &str) -> io::Result<()> {
        let n = self.socket.send_to_addr(state.as_bytes(), &self.target)?;
        if n != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to NOTIFY_SOCKET",
            ));
        }
        Ok(())
    }

    /// The watchdog interval the service manager enforces (`WatchdogSec=`), if any.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }
}

fn global() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            let var = |k: &str| std::env::var(k).ok();
            match Notifier::from_vars(
                var("NOTIFY_SOCKET").as_deref(),
                var("WATCHDOG_USEC").as_deref(),
                var("WATCHDOG_PID").as_deref(),
            ) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("ignoring NOTIFY_SOCKET: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Sends `state` to the service manager, if there is one; returns whether it was sent.
pub fn notify(state: &str) -> bool {
    static FAILED: AtomicBool = AtomicBool::new(false);
    let Some(n) = global() else {
        return false;
    };
    match n.send(state) {
        Ok(()) => true,
        Err(e) => {
            // Once: a watchdog ping that fails would otherwise log every few seconds.
            if !FAILED.swap(true, Ordering::Relaxed) {
                tracing::warn!("cannot notify the service manager: {e}");
            }
            false
        }
    }
}

/// Whether a service manager listens for notifications.
pub fn enabled() -> bool {
    global().is_some()
}

/// The watchdog interval, if the service manager asked for pings.
pub fn watchdog_interval() -> Option<Duration> {
    global().and_then(Notifier::watchdog_interval)
}

/// `READY=1` with a status line: the listeners are bound and every worker runs.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// `WATCHDOG=1`: the data path has proven itself alive since the last ping.
pub fn watchdog() -> bool {
    notify("WATCHDOG=1")
}

/// `STOPPING=1`: graceful shutdown has begun.
pub fn stopping() -> bool {
    notify("STOPPING=1\nSTATUS=shutting down: closing sessions")
}

/// `RELOADING=1`: a reload has begun; send [`ready`] when it is done. `MONOTONIC_USEC`
/// is required by `Type=notify-reload` (systemd 253+) and ignored by older managers.
pub fn reloading() -> bool {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
        monotonic_usec()
    ))
}

/// `STATUS=…`: the line `systemctl status` shows.
pub fn status(text: &str) -> bool {
    notify(&format!("STATUS={}", one_line(text)))
}

/// A status must stay one assignment: newlines would start new ones.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn path_socket_receives_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::from_vars(path.to_str(), Some("2000000"), None)
            .expect("valid")
            .expect("some");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        n.send("READY=1").expect("send");
        assert_eq!(recv(&listener), "READY=1");
    }

    #[test]
    fn abstract_socket_receives_messages() {
        let name = format!("devgate-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind");
        let n = Notifier::from_vars(Some(&format!("@{name}")), None, None)
            .expect("valid")
            .expect("some");
        assert_eq!(n.watchdog_interval(), None);
        n.send("WATCHDOG=1").expect("send");
        assert_eq!(recv(&listener), "WATCHDOG=1");
    }

    #[test]
    fn watchdog_for_another_pid_is_ignored_and_bad_names_are_errors() {
        let n = Notifier::from_vars(Some("@x"), Some("1000000"), Some("1"))
            .expect("valid")
            .expect("some");
        assert_eq!(n.watchdog_interval(), None);
        let own = std::process::id().to_string();
        let n = Notifier::from_vars(Some("@x"), Some("1000000"), Some(&own))
            .expect("valid")
            .expect("some");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(1)));
        assert!(Notifier::from_vars(Some("relative/path"), None, None).is_err());
        assert!(
            Notifier::from_vars(None, Some("1"), None)
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn status_stays_one_assignment() {
        assert_eq!(one_line("a\nb\r"), "a b ");
    }
}
