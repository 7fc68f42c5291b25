//! The live display: one line with sessions, handshakes/s, frames/s and errors,
//! on stderr, only when it is a terminal (or `--progress`).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::TimelineEntry;

#[derive(Debug)]
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    /// The latest tick of each worker.
    latest: Vec<TimelineEntry>,
}

impl Progress {
    pub(crate) fn new(forced: bool, devices: usize, workers: usize) -> Self {
        let bar = (forced || std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(devices as u64),
                ProgressDrawTarget::stderr_with_hz(4),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} sessions  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            latest: vec![TimelineEntry::default(); workers],
        }
    }

    pub(crate) fn tick(&mut self, worker: usize, e: TimelineEntry, phase: &str) {
        if let Some(slot) = self.latest.get_mut(worker) {
            *slot = e;
        }
        let Some(bar) = &self.bar else {
            return;
        };
        let sum = |f: fn(&TimelineEntry) -> i64| self.latest.iter().map(f).sum::<i64>();
        let sessions = sum(|e| e.sessions);
        bar.set_position(u64::try_from(sessions).unwrap_or(0));
        bar.set_message(format!(
            "{phase}  {} handshakes/s  {} frames/s  {} errors/s",
            sum(|e| i64::try_from(e.handshakes).unwrap_or(i64::MAX)),
            sum(|e| i64::try_from(e.frames).unwrap_or(i64::MAX)),
            sum(|e| i64::try_from(e.errors).unwrap_or(i64::MAX)),
        ));
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
