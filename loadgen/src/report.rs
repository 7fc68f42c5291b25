//! Figures: live counters shared by a process's tasks ([`Stats`]), what one
//! worker hands its parent ([`WorkerReport`], histograms in HDR's V2 format),
//! and the final [`Report`] written as JSON and printed as a table.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// Latencies are recorded in µs, up to 10 minutes, 3 significant digits.
const HIST_MAX_US: u64 = 600_000_000;

pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3)
        .expect("constant histogram bounds are valid (1 ≤ low, high ≥ 2·low, 3 digits)")
}

pub(crate) fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, HIST_MAX_US);
    let _ = h.record(us);
}

/// A histogram as base64 of its V2 serialization, for the parent to merge.
pub(crate) fn encode_hist(h: &Histogram<u64>) -> Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

pub(crate) fn decode_hist(s: &str) -> Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("histogram from a worker is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram from a worker is not HDR V2: {e:?}"))
}

/// Milliseconds since the Unix epoch: the clock workers and parent share.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Counters of one process, updated by every task.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) sessions: AtomicI64,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) resumed: AtomicU64,
    pub(crate) full_handshakes: AtomicU64,
    pub(crate) retries: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    error_count: AtomicU64,
    pub(crate) connect_hist: Mutex<Option<Histogram<u64>>>,
    pub(crate) rtt_hist: Mutex<Option<Histogram<u64>>>,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            connect_hist: Mutex::new(Some(new_hist())),
            rtt_hist: Mutex::new(Some(new_hist())),
            ..Self::default()
        }
    }

    /// Counts an error of `kind` (a short, stable description).
    pub(crate) fn error(&self, kind: &str) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(kind.to_owned()).or_default() += 1;
        }
    }

    pub(crate) fn errors(&self) -> u64 {
        self.error_count.load(Ordering::Relaxed)
    }

    pub(crate) fn errors_by_kind(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub(crate) fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn merge_rtt(&self, h: &Histogram<u64>) {
        if let Ok(mut g) = self.rtt_hist.lock()
            && let Some(all) = g.as_mut()
        {
            let _ = all.add(h);
        }
    }

    pub(crate) fn record_connect(&self, d: Duration) {
        if let Ok(mut g) = self.connect_hist.lock()
            && let Some(h) = g.as_mut()
        {
            record(h, d);
        }
    }

    fn hist(m: &Mutex<Option<Histogram<u64>>>) -> Histogram<u64> {
        m.lock().ok().and_then(|g| g.clone()).unwrap_or_else(new_hist)
    }
}

/// One second of the run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct TimelineEntry {
    /// Seconds since the start of the run.
    pub(crate) t: u64,
    /// Sessions open at the end of that second.
    pub(crate) sessions: i64,
    /// Frames sent or received by the simulated peers during that second.
    pub(crate) frames: u64,
    /// Completed TLS handshakes during that second.
    pub(crate) handshakes: u64,
    /// Errors during that second.
    pub(crate) errors: u64,
}

/// How late after a whole second a sample may be and still close that second.
const SAMPLE_SLACK_MS: u64 = 200;

/// Samples [`Stats`] once a second into a timeline.
#[derive(Debug)]
pub(crate) struct Sampler {
    epoch_ms: u64,
    last: (u64, u64, u64),
    pub(crate) entries: Vec<TimelineEntry>,
}

impl Sampler {
    pub(crate) fn new(epoch_ms: u64) -> Self {
        Self {
            epoch_ms,
            last: (0, 0, 0),
            entries: Vec::new(),
        }
    }

    pub(crate) fn sample(&mut self, s: &Stats) {
        // Samples are taken just after whole seconds: entry `t` covers (t-1, t]. A
        // final sample later in a second starts that second's entry.
        let t = unix_ms()
            .saturating_sub(self.epoch_ms)
            .saturating_sub(SAMPLE_SLACK_MS)
            .div_ceil(1000);
        let now = (
            s.frames.load(Ordering::Relaxed),
            s.handshakes.load(Ordering::Relaxed),
            s.errors(),
        );
        let entry = TimelineEntry {
            t,
            sessions: s.sessions.load(Ordering::Relaxed),
            frames: now.0.saturating_sub(self.last.0),
            handshakes: now.1.saturating_sub(self.last.1),
            errors: now.2.saturating_sub(self.last.2),
        };
        self.last = now;
        match self.entries.last_mut() {
            // Two samples in one second (a final sample): fold them together.
            Some(prev) if prev.t == t => {
                prev.sessions = entry.sessions;
                prev.frames += entry.frames;
                prev.handshakes += entry.handshakes;
                prev.errors += entry.errors;
            }
            _ => self.entries.push(entry),
        }
    }
}

/// Sums timelines second by second (sessions add up too: each worker owns its own).
pub(crate) fn merge_timelines(parts: &[&[TimelineEntry]]) -> Vec<TimelineEntry> {
    let mut by_t: BTreeMap<u64, TimelineEntry> = BTreeMap::new();
    for part in parts {
        for e in *part {
            let m = by_t.entry(e.t).or_insert(TimelineEntry {
                t: e.t,
                ..TimelineEntry::default()
            });
            m.sessions += e.sessions;
            m.frames += e.frames;
            m.handshakes += e.handshakes;
            m.errors += e.errors;
        }
    }
    by_t.into_values().collect()
}

/// What a worker (a process or the in-process share) reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerReport {
    pub(crate) devices: usize,
    pub(crate) sessions: usize,
    pub(crate) connect_secs: f64,
    pub(crate) handshakes: u64,
    pub(crate) resumed: u64,
    pub(crate) full_handshakes: u64,
    pub(crate) retries: u64,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    pub(crate) errors_by_kind: BTreeMap<String, u64>,
    pub(crate) timeline: Vec<TimelineEntry>,
    /// V2 + base64.
    pub(crate) connect_hist: String,
    pub(crate) rtt_hist: String,
    /// Storm: seconds from the storm to this worker's last device back.
    pub(crate) all_back_secs: Option<f64>,
    pub(crate) back: usize,
    /// Handshakes before the go (the ramp); `handshakes` counts those after it.
    pub(crate) handshakes_at_go: u64,
}

impl WorkerReport {
    pub(crate) fn from_stats(s: &Stats, sampler: Sampler) -> Result<Self> {
        Ok(Self {
            handshakes: s.handshakes.load(Ordering::Relaxed),
            resumed: s.resumed.load(Ordering::Relaxed),
            full_handshakes: s.full_handshakes.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            frames: s.frames.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            errors_by_kind: s.errors_by_kind(),
            timeline: sampler.entries,
            connect_hist: encode_hist(&Stats::hist(&s.connect_hist))?,
            rtt_hist: encode_hist(&Stats::hist(&s.rtt_hist))?,
            ..Self::default()
        })
    }
}

/// Every figure of a run: the `--json` document.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) sessions: usize,
    pub(crate) devices: usize,
    pub(crate) managers: usize,
    pub(crate) processes: usize,
    pub(crate) sources: u8,
    pub(crate) duration_secs: f64,
    pub(crate) errors: u64,
    pub(crate) errors_by_kind: BTreeMap<String, u64>,
    pub(crate) retries: u64,
    pub(crate) connect_secs: f64,
    pub(crate) connects_per_sec: f64,
    pub(crate) connect_p50_us: u64,
    pub(crate) connect_p90_us: u64,
    pub(crate) connect_p99_us: u64,
    pub(crate) connect_p999_us: u64,
    pub(crate) connect_max_us: u64,
    pub(crate) commands: u64,
    pub(crate) responses: u64,
    pub(crate) events: u64,
    pub(crate) frames_per_sec: f64,
    pub(crate) commands_per_sec: f64,
    pub(crate) rtt_p50_us: u64,
    pub(crate) rtt_p90_us: u64,
    pub(crate) rtt_p99_us: u64,
    pub(crate) rtt_p999_us: u64,
    pub(crate) rtt_max_us: u64,
    /// Frames the simulated devices received and sent.
    pub(crate) device_frames: u64,
    pub(crate) bytes: u64,
    pub(crate) bytes_per_sec: f64,
    pub(crate) enrollments_per_sec: f64,
    pub(crate) all_back_secs: Option<f64>,
    pub(crate) handshakes: u64,
    pub(crate) handshakes_per_sec: f64,
    pub(crate) peak_handshakes_per_sec: u64,
    pub(crate) resumed: u64,
    pub(crate) full_handshakes: u64,
    pub(crate) gateway_rss_before_kib: Option<u64>,
    pub(crate) gateway_rss_after_kib: Option<u64>,
    pub(crate) gateway_rss_per_session_bytes: Option<f64>,
    pub(crate) timeline: Vec<TimelineEntry>,
    /// `[percentile, µs]` points of the round-trip latency (connect latency when there
    /// is no round trip), for a CDF plot.
    pub(crate) rtt_cdf: Vec<(f64, u64)>,
}

/// Percentiles of the CDF: dense at the tail, where the plot is interesting.
const CDF_POINTS: [f64; 16] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999,
    99.9999, 100.0,
];

impl Report {
    pub(crate) fn set_rtt(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.rtt_p50_us = h.value_at_quantile(0.50);
        self.rtt_p90_us = h.value_at_quantile(0.90);
        self.rtt_p99_us = h.value_at_quantile(0.99);
        self.rtt_p999_us = h.value_at_quantile(0.999);
        self.rtt_max_us = h.max();
        self.rtt_cdf = cdf(h);
    }

    pub(crate) fn set_connect(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.connect_p50_us = h.value_at_quantile(0.50);
        self.connect_p90_us = h.value_at_quantile(0.90);
        self.connect_p99_us = h.value_at_quantile(0.99);
        self.connect_p999_us = h.value_at_quantile(0.999);
        self.connect_max_us = h.max();
        if self.rtt_cdf.is_empty() {
            self.rtt_cdf = cdf(h);
        }
    }

    pub(crate) fn set_rss(&mut self, before: Option<u64>, after: Option<u64>) {
        self.gateway_rss_before_kib = before;
        self.gateway_rss_after_kib = after;
        if let (Some(b), Some(a)) = (before, after)
            && self.sessions > 0
        {
            self.gateway_rss_per_session_bytes =
                Some((a.saturating_sub(b) * 1024) as f64 / self.sessions as f64);
        }
    }

    pub(crate) fn finish_errors(&mut self) {
        self.errors = self.errors_by_kind.values().sum();
    }

    /// Adds the workers' counters, histograms and timelines.
    pub(crate) fn absorb(
        &mut self,
        workers: &[WorkerReport],
        own: &Stats,
        own_timeline: &[TimelineEntry],
    ) -> Result<()> {
        let mut connect = Stats::hist(&own.connect_hist);
        let mut rtt = Stats::hist(&own.rtt_hist);
        self.errors_by_kind = own.errors_by_kind();
        self.handshakes = own.handshakes.load(Ordering::Relaxed);
        self.resumed = own.resumed.load(Ordering::Relaxed);
        self.full_handshakes = own.full_handshakes.load(Ordering::Relaxed);
        self.retries = own.retries.load(Ordering::Relaxed);
        let mut timelines: Vec<&[TimelineEntry]> = vec![own_timeline];
        for w in workers {
            self.sessions += w.sessions;
            self.connect_secs = self.connect_secs.max(w.connect_secs);
            self.handshakes += w.handshakes;
            self.resumed += w.resumed;
            self.full_handshakes += w.full_handshakes;
            self.retries += w.retries;
            self.bytes += w.bytes;
            self.device_frames += w.frames;
            for (k, v) in &w.errors_by_kind {
                *self.errors_by_kind.entry(k.clone()).or_default() += v;
            }
            connect.add(decode_hist(&w.connect_hist)?)?;
            rtt.add(decode_hist(&w.rtt_hist)?)?;
            timelines.push(&w.timeline);
        }
        self.timeline = merge_timelines(&timelines);
        self.set_rtt(&rtt);
        self.set_connect(&connect);
        self.finish_errors();
        self.connects_per_sec = self.sessions as f64 / self.connect_secs.max(1e-9);
        Ok(())
    }

    /// The table printed at the end.
    pub(crate) fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "{k:<22}{v}");
        };
        row("scenario", self.scenario.clone());
        row(
            "sessions",
            format!(
                "{} of {} devices + {} managers ({} processes, {} source addresses)",
                self.sessions, self.devices, self.managers, self.processes, self.sources
            ),
        );
        row(
            "connect",
            format!(
                "{:.2} s ({:.0}/s), latency p50 {} µs p99 {} µs",
                self.connect_secs, self.connects_per_sec, self.connect_p50_us, self.connect_p99_us
            ),
        );
        match self.scenario.as_str() {
            "enroll" => row(
                "enrollments",
                format!(
                    "{:.0}/s, p50 {} µs p99 {} µs",
                    self.enrollments_per_sec, self.rtt_p50_us, self.rtt_p99_us
                ),
            ),
            "steady" => {
                row(
                    "commands answered",
                    format!("{} of {} ({} events)", self.responses, self.commands, self.events),
                );
                row("frames routed/s", format!("{:.0}", self.frames_per_sec));
                row(
                    "round trip",
                    format!(
                        "p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
                        self.rtt_p50_us,
                        self.rtt_p90_us,
                        self.rtt_p99_us,
                        self.rtt_p999_us,
                        self.rtt_max_us
                    ),
                );
            }
            "stream" => row(
                "stream throughput",
                format!(
                    "{:.1} MB/s ({} bytes, {:.0} data frames/s)",
                    self.bytes_per_sec / 1e6,
                    self.bytes,
                    self.frames_per_sec
                ),
            ),
            "storm" | "churn" => {
                if let Some(b) = self.all_back_secs {
                    row("all back after", format!("{b:.2} s"));
                }
                row(
                    "handshakes",
                    format!(
                        "{} ({} resumed, {} full), {:.0}/s avg, {}/s peak, {} retries",
                        self.handshakes,
                        self.resumed,
                        self.full_handshakes,
                        self.handshakes_per_sec,
                        self.peak_handshakes_per_sec,
                        self.retries
                    ),
                );
            }
            _ => {}
        }
        if let (Some(b), Some(a)) = (self.gateway_rss_before_kib, self.gateway_rss_after_kib) {
            row(
                "gateway RSS",
                format!(
                    "{b} KiB → {a} KiB ({:.0} bytes per session)",
                    self.gateway_rss_per_session_bytes.unwrap_or(0.0)
                ),
            );
        }
        row("errors", format!("{} {:?}", self.errors, self.errors_by_kind));
        s
    }
}

/// `[percentile, µs]` points.
fn cdf(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    CDF_POINTS
        .iter()
        .map(|&p| (p, h.value_at_percentile(p)))
        .collect()
}

/// VmRSS of a process in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Seconds since `t` as f64.
pub(crate) fn secs_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_between_processes() -> Result<()> {
        let mut h = new_hist();
        for us in [5, 50, 500, 5000] {
            h.record(us)?;
        }
        let back = decode_hist(&encode_hist(&h)?)?;
        assert_eq!(back.len(), 4);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        Ok(())
    }

    #[test]
    fn timelines_add_up_by_second() {
        let a = [TimelineEntry { t: 1, sessions: 3, frames: 10, handshakes: 3, errors: 0 }];
        let b = [
            TimelineEntry { t: 1, sessions: 2, frames: 5, handshakes: 2, errors: 1 },
            TimelineEntry { t: 2, sessions: 2, frames: 1, handshakes: 0, errors: 0 },
        ];
        let m = merge_timelines(&[&a, &b]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].sessions, 5);
        assert_eq!(m[0].frames, 15);
        assert_eq!(m[0].errors, 1);
        assert_eq!(m[1].t, 2);
    }
}
