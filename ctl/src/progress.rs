//! What `push` and `pull` show: one progress line on stderr while it runs (only on a
//! terminal), then a table with one row per device on stdout.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counters the transfers update and the progress line reads.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Bytes moved, over all devices and attempts.
    pub(crate) bytes: AtomicU64,
    /// Devices finished (either way) and of those, failed.
    pub(crate) done: AtomicUsize,
    pub(crate) failed: AtomicUsize,
}

/// Draws the progress line every half second while `progress` runs; returns a handle that
/// stops it (and clears the line) when dropped. Does nothing unless stderr is a terminal.
pub(crate) fn start_line(
    what: String,
    devices: usize,
    total_bytes: u64,
    progress: Arc<Progress>,
) -> Option<LineGuard> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let started = Instant::now();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let bytes = progress.bytes.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            // A pull learns the size only from the device: then no share is shown.
            let of = if total_bytes == 0 {
                String::new()
            } else {
                format!(
                    " of {} ({:.0} %)",
                    human(total_bytes),
                    100.0 * bytes as f64 / total_bytes as f64
                )
            };
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[K{what}: {}/{devices} devices done ({} failed), {}{of}, {}/s",
                progress.done.load(Ordering::Relaxed),
                progress.failed.load(Ordering::Relaxed),
                human(bytes),
                human((bytes as f64 / secs) as u64),
            );
            let _ = err.flush();
        }
    });
    Some(LineGuard(task))
}

/// Stops the progress line.
pub(crate) struct LineGuard(tokio::task::JoinHandle<()>);

impl Drop for LineGuard {
    fn drop(&mut self) {
        self.0.abort();
        eprint!("\r\x1b[K");
    }
}

/// One device's outcome.
#[derive(Debug, Clone)]
pub(crate) struct DeviceResult {
    pub(crate) unit: String,
    /// `None` when it worked, else why not.
    pub(crate) error: Option<String>,
    /// File bytes moved over all attempts (what a resume saves shows here).
    pub(crate) bytes: u64,
    /// Where the last attempt started: more than 0 when it resumed a partial file.
    pub(crate) resumed_at: u64,
    /// Streams opened (1 when nothing went wrong).
    pub(crate) attempts: u32,
    pub(crate) elapsed: Duration,
}

/// Prints the table (stdout): `UNIT RESULT BYTES RESUMED_AT ATTEMPTS SECONDS DETAIL`.
pub(crate) fn print_table(results: &[DeviceResult]) {
    let width = results
        .iter()
        .map(|r| r.unit.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:width$}  RESULT  {:>12}  {:>12}  ATTEMPTS  SECONDS  DETAIL",
        "UNIT", "BYTES", "RESUMED_AT"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:width$}  {:6}  {:>12}  {:>12}  {:>8}  {:>7.1}  {}",
            r.unit,
            if r.error.is_none() { "ok" } else { "failed" },
            r.bytes,
            r.resumed_at,
            r.attempts,
            r.elapsed.as_secs_f64(),
            r.error.as_deref().unwrap_or("-"),
        );
    }
}

/// Bytes for people: 1.5 GiB, 20.0 MiB, 512 B.
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(20 << 20), "20.0 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
