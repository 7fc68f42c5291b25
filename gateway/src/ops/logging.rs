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

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber. `format` is `plain` or `json`; the level filter comes
/// from `$DEVGATE_LOG` (e.g. `info`, `debug`, `gateway=debug`), default `info`.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_env("DEVGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // `try_init`: a second call (tests) keeps the first subscriber instead of panicking.
    let _ = if format == "json" {
        builder.json().try_init()
    } else if stderr_is_journal() {
        builder
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .try_init()
    } else {
        builder.try_init()
    };
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
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }
}
