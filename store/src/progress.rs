//! Transfer progress: counters the transfer engine bumps, and a reporter that shows them.
//!
//! [`Progress`] is cheap to clone and lock-free; a long-running caller (`run`) can read
//! [`Progress::bytes_done`] at any time, e.g. to estimate whether an upload beats a deadline.
//! [`report_progress`] draws a bar on a terminal and logs a line periodically otherwise.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the terminal bar redraws: smooth to the eye, negligible CPU.
const BAR_INTERVAL: Duration = Duration::from_millis(200);
/// How often a log line is written when stderr is not a terminal: often enough to see a
/// stalled upload in `kubectl logs`, rare enough not to flood it.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Default)]
struct Counters {
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_reused: AtomicU64,
    files_total: AtomicU64,
    files_done: AtomicU64,
}

/// Shared counters of one transfer.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    counters: Arc<Counters>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Bytes that have to move (excluding reused ones), known after the directory scan.
    pub fn add_total(&self, files: u64, bytes: u64) {
        self.counters
            .files_total
            .fetch_add(files, Ordering::Relaxed);
        self.counters
            .bytes_total
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_done(&self, bytes: u64) {
        self.counters.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes back bytes counted for a request that then failed and will be sent again.
    pub fn sub_done(&self, bytes: u64) {
        self.counters.bytes_done.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn add_reused(&self, bytes: u64) {
        self.counters
            .bytes_reused
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn file_done(&self) {
        self.counters.files_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes_total(&self) -> u64 {
        self.counters.bytes_total.load(Ordering::Relaxed)
    }

    /// Bytes transferred so far.
    pub fn bytes_done(&self) -> u64 {
        self.counters.bytes_done.load(Ordering::Relaxed)
    }

    pub fn bytes_reused(&self) -> u64 {
        self.counters.bytes_reused.load(Ordering::Relaxed)
    }

    pub fn files_total(&self) -> u64 {
        self.counters.files_total.load(Ordering::Relaxed)
    }

    pub fn files_done(&self) -> u64 {
        self.counters.files_done.load(Ordering::Relaxed)
    }
}

/// Shows progress until `stop` is cancelled: a bar when stderr is a terminal, a log line every
/// [`LOG_INTERVAL`] otherwise. Clears the bar when done.
pub async fn report_progress(progress: Progress, verb: &'static str, stop: CancellationToken) {
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let interval = if terminal { BAR_INTERVAL } else { LOG_INTERVAL };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let elapsed = started.elapsed().as_secs_f64();
        let moved = progress.bytes_done();
        let rate = moved as f64 / MIB / elapsed.max(0.001);
        // Reused bytes count as done: they are in the store already.
        let done = moved + progress.bytes_reused();
        let total = progress.bytes_total().max(done);
        if terminal {
            let filled = done
                .saturating_mul(BAR_WIDTH as u64)
                .checked_div(total)
                .map_or(BAR_WIDTH, |f| usize::try_from(f).unwrap_or(BAR_WIDTH))
                .min(BAR_WIDTH);
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled));
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r{verb} [{bar}] {} / {}  {rate:.0} MiB/s  files {}/{}  ",
                format_bytes(done),
                format_bytes(total),
                progress.files_done(),
                progress.files_total(),
            );
            let _ = err.flush();
        } else {
            tracing::info!(
                bytes_done = done,
                bytes_total = total,
                files_done = progress.files_done(),
                files_total = progress.files_total(),
                "{verb}: {} of {} ({rate:.0} MiB/s)",
                format_bytes(done),
                format_bytes(total),
            );
        }
    }
    if terminal {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{:width$}\r", "", width = BAR_WIDTH + 80);
        let _ = err.flush();
    }
}

/// `1.5 GiB`, `12.0 MiB`, `900 B`.
pub fn format_bytes(bytes: u64) -> String {
    let value = bytes as f64;
    if value >= 1024.0 * MIB {
        format!("{:.1} GiB", value / (1024.0 * MIB))
    } else if value >= MIB {
        format!("{:.1} MiB", value / MIB)
    } else if value >= 1024.0 {
        format!("{:.1} KiB", value / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// MiB per second, guarding against a zero duration.
pub fn mib_per_second(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB / seconds.max(0.001)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_in_binary_units() {
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
    }
}
