//! How much time a notice leaves, and how much of it the upload will need.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

/// Upload throughput assumed before anything was measured: a conservative figure for one pod's
/// share of an instance's network to S3 (bench/transfer measures far more on a quiet link).
pub const DEFAULT_THROUGHPUT_BYTES_PER_SECOND: f64 = 100.0 * 1024.0 * 1024.0;

/// Kept free before the deadline when deciding how long to wait for the trainer: the manifest
/// write, retries and clock skew between the cloud and this node.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(5);

/// Uploads smaller than this say more about request latency than about throughput.
const MIN_MEASURED_BYTES: u64 = 8 * 1024 * 1024;

/// Weight of the newest measurement in the running estimate.
const SMOOTHING: f64 = 0.5;

/// Running estimate of upload throughput.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    bytes_per_second: f64,
    measured: bool,
}

impl Throughput {
    pub fn assumed(bytes_per_second: f64) -> Throughput {
        Throughput {
            bytes_per_second: bytes_per_second.max(1.0),
            measured: false,
        }
    }

    /// Folds in one upload; tiny uploads are ignored.
    pub fn record(&mut self, bytes: u64, seconds: f64) {
        if bytes < MIN_MEASURED_BYTES || seconds <= 0.0 {
            return;
        }
        let sample = bytes as f64 / seconds;
        self.bytes_per_second = if self.measured {
            SMOOTHING * sample + (1.0 - SMOOTHING) * self.bytes_per_second
        } else {
            sample
        };
        self.measured = true;
    }

    pub fn bytes_per_second(&self) -> f64 {
        self.bytes_per_second
    }

    /// Time `bytes` take at this throughput.
    pub fn time_for(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_second)
    }
}

/// A notice's deadline on this process's monotonic clock.
pub fn deadline_instant(deadline: OffsetDateTime) -> Instant {
    let left = deadline - OffsetDateTime::now_utc();
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    Instant::now() + left
}

/// The latest moment to stop waiting for the trainer so that `pending_bytes` still reach the
/// store before `deadline` (with the safety margin). Never earlier than now.
pub fn checkpoint_cutoff(
    deadline: Instant,
    pending_bytes: u64,
    throughput: &Throughput,
) -> Instant {
    let needed = throughput.time_for(pending_bytes) + SAFETY_MARGIN;
    deadline
        .checked_sub(needed)
        .unwrap_or_else(Instant::now)
        .max(Instant::now().min(deadline))
}

/// Time left until `deadline` in seconds, negative once passed.
pub fn seconds_left(deadline: Instant) -> f64 {
    let now = Instant::now();
    if deadline >= now {
        (deadline - now).as_secs_f64()
    } else {
        -(now - deadline).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_measured_uploads_and_ignores_tiny_ones() {
        let mut throughput = Throughput::assumed(DEFAULT_THROUGHPUT_BYTES_PER_SECOND);
        throughput.record(1024, 0.001);
        assert_eq!(
            throughput.bytes_per_second(),
            DEFAULT_THROUGHPUT_BYTES_PER_SECOND
        );
        throughput.record(400 << 20, 2.0);
        assert_eq!(throughput.bytes_per_second(), (200 << 20) as f64);
        assert_eq!(throughput.time_for(400 << 20), Duration::from_secs(2));
    }

    #[test]
    fn the_cutoff_leaves_the_upload_time_and_the_margin_before_the_deadline() {
        let throughput = Throughput::assumed((100 << 20) as f64);
        let deadline = Instant::now() + Duration::from_secs(120);
        let cutoff = checkpoint_cutoff(deadline, 1000 << 20, &throughput);
        assert_eq!(deadline - cutoff, Duration::from_secs(10) + SAFETY_MARGIN);
        // More bytes than the window allows (200 s of upload in 120 s): stop waiting now, not
        // 85 s in the past.
        let before = Instant::now();
        let cutoff = checkpoint_cutoff(deadline, 20_000 << 20, &throughput);
        assert!(cutoff >= before, "the cutoff is in the past");
        assert!(cutoff <= Instant::now());
        // A deadline already passed: the cutoff is that deadline, never later.
        let passed = before.checked_sub(Duration::from_secs(1)).unwrap();
        assert_eq!(checkpoint_cutoff(passed, 0, &throughput), passed);
    }
}
