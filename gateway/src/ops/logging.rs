//! Log output: plain lines on stderr by default, JSON lines with `--log-format json`.
//!
//! Under systemd (stderr connected to the journal, detected through `$JOURNAL_STREAM`)
//! plain lines carry no timestamp, since journald stamps every line itself, and start with
//! a `<N>` syslog priority prefix, which journald turns into the entry's priority so that
//! `journalctl -p warning` works. Elsewhere (a terminal, a test harness) lines keep their
//! timestamp and have no prefix.
//!
//! Nothing the gateway logs contains key material: certificates are named by subject and
//! file, keys by file only.
//!
//! Lines logged by dependencies (rustls warns once per odd record a peer sends — a stray
//! ChangeCipherSpec, an illegal SNI) go through the same per-site budget as the gateway's
//! own [`crate::warn_limited!`] lines, one budget per dependency ([`DependencyLimit`]):
//! an unauthenticated peer must not be able to fill the disk by opening connections.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::ops::ratelimit::RateLimit;

/// Installs the global subscriber. `format` is `plain` or `json`; the level filter comes
/// from `$DEVGATE_LOG` (e.g. `info`, `debug`, `gateway=debug`), default `info`.
pub fn init(format: &str) {
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::fmt;
    let filter = EnvFilter::try_from_env("DEVGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // The level filter first, so that the budget counts only lines that would be written.
    let filter = filter.and(DependencyLimit);
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let registry = tracing_subscriber::registry();
    // `try_init`: a second call (tests) keeps the first subscriber instead of panicking.
    // It also routes the `log` records of dependencies (rustls) into tracing.
    let _ = if format == "json" {
        registry.with(layer.json().with_filter(filter)).try_init()
    } else if stderr_is_journal() {
        registry
            .with(
                layer
                    .event_format(Journald(fmt::format().without_time()))
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry.with(layer.with_filter(filter)).try_init()
    };
}

/// Passes the gateway's own events and rate-limits everyone else's: rustls under one
/// budget, all other dependencies under another (summarised like `warn_limited!`).
#[derive(Debug, Clone, Copy)]
pub struct DependencyLimit;

static RUSTLS: RateLimit = RateLimit::new("rustls (dependency)");
static OTHER_DEPENDENCIES: RateLimit = RateLimit::new("other dependencies");

/// The target of an event: the `log` record's own (`log.target`) for records bridged
/// from the `log` crate, whose tracing metadata says only `log`.
fn event_target(event: &Event<'_>) -> Option<String> {
    struct LogTarget(Option<String>);
    impl Visit for LogTarget {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "log.target" {
                self.0 = Some(value.to_owned());
            }
        }
        fn record_debug(&mut self, _field: &Field, _value: &dyn fmt::Debug) {}
    }
    let target = event.metadata().target();
    if target != "log" {
        return None; // a tracing event: its metadata target is the real one
    }
    let mut v = LogTarget(None);
    event.record(&mut v);
    v.0
}

/// Whether events of `target` are the gateway's own (not rate-limited here).
fn is_own(target: &str) -> bool {
    // The library, the binary and the workspace's `devgate_*` crates.
    target.starts_with("devgate_")
        || ["gateway", "devgate"].iter().any(|own| {
            target
                .strip_prefix(own)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

impl DependencyLimit {
    /// Whether an event of `target` may be written now.
    fn admit(target: &str) -> bool {
        if is_own(target) {
            true
        } else if target == "rustls" || target.starts_with("rustls::") {
            RUSTLS.admit()
        } else {
            OTHER_DEPENDENCIES.admit()
        }
    }
}

impl<S> Filter<S> for DependencyLimit {
    fn enabled(&self, _meta: &tracing::Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        match event_target(event) {
            Some(target) => Self::admit(&target),
            None => Self::admit(event.metadata().target()),
        }
    }
}

/// Prefixes each line with its syslog priority (`sd-daemon(3)`'s `SD_WARNING` etc.).
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Formatted into a buffer first: without a timestamp the right-aligned level
        // (" INFO") would start the journal message with a space.
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        write!(
            writer,
            "<{}>{}",
            syslog_priority(*event.metadata().level()),
            line.trim_start()
        )
    }
}

/// Syslog priority of a tracing level.
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is the journal stream systemd set up for us: `$JOURNAL_STREAM` holds
/// `device:inode` of that stream, and only counts if stderr is still that file (a child
/// whose stderr was redirected inherits the variable but not the stream).
fn stderr_is_journal() -> bool {
    let Ok(var) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes only into the struct we pass; fd 2 may be closed (then it fails).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_targets_pass_and_dependencies_are_budgeted() {
        assert!(is_own("gateway"));
        assert!(is_own("gateway::worker"));
        assert!(is_own("devgate"));
        assert!(!is_own("gatewayish"));
        assert!(!is_own("rustls::check"));
        let admitted = (0..100)
            .filter(|_| DependencyLimit::admit("rustls::check"))
            .count();
        assert!(
            admitted <= crate::ops::ratelimit::BURST as usize,
            "{admitted} rustls lines in one window"
        );
        assert!((0..100).all(|_| DependencyLimit::admit("gateway::worker")));
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }
}
