//! When the trainer was last seen running, so that a SIGTERM arriving after it exited (Kubernetes
//! stops a native sidecar only once the trainer container is gone) knows how much of the pod's
//! grace period is left: the grace period started at the pod's deletion, before the trainer
//! exited, so it ends no later than the last sighting plus the grace period.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::signal::{self, Scope};

/// Time between looks at the pod's processes: the estimate of the grace period left errs by at
/// most this (against an injected pod's five-minute grace period), and a pod's `/proc` holds a
/// handful of processes, so a look costs well under a millisecond.
pub const TRAINER_WATCH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct TrainerWatch {
    last_seen: Mutex<Option<OffsetDateTime>>,
}

impl TrainerWatch {
    /// Whether a process of the trainer runs now (a candidate, with or without a handler).
    pub fn trainer_running(&self, signal: Signal, scope: &Scope) -> bool {
        let running = signal::find_candidates(signal, scope)
            .map(|candidates| candidates.all().next().is_some())
            .unwrap_or(false);
        if running {
            *self.lock() = Some(OffsetDateTime::now_utc());
        }
        running
    }

    /// The latest the grace period can end: the trainer's last sighting (now, if it was never
    /// seen) plus `grace`.
    pub fn grace_deadline(&self, grace: Duration) -> OffsetDateTime {
        self.lock().unwrap_or_else(OffsetDateTime::now_utc) + grace
    }

    /// Looks every [`TRAINER_WATCH_INTERVAL`] until `stop`.
    pub async fn watch(self: Arc<Self>, signal: Signal, scope: Scope, stop: CancellationToken) {
        loop {
            let (watch, scope) = (self.clone(), scope.clone());
            let _ =
                tokio::task::spawn_blocking(move || watch.trainer_running(signal, &scope)).await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(TRAINER_WATCH_INTERVAL) => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OffsetDateTime>> {
        self.last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
