//! Background sync: uploading each completed periodic checkpoint before any notice, so that
//! when one comes only the new bytes remain (checkpoints too big for a two-minute window).
//!
//! Runs at a modest concurrency so it does not starve the trainer's own I/O. A notice preempts
//! it at once: the upload in flight is cancelled (its multipart uploads aborted, no manifest
//! written) and the notice's upload runs at full speed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nerve_store::part::Rank;
use nix::sys::signal::Signal;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{self, Completion, Content, DirSnapshot, MarkerState};
use super::deadline::Throughput;
use super::signal::{self, Scope};
use crate::metrics;
use nerve_store::Store;
use nerve_store::{ManifestContext, UploadOptions, upload_generation};

/// After a "prepare" notice asked for a sync now: how often to look again until the directory is
/// in the store (a checkpoint still being written needs its quiet period first).
const URGENT_RECHECK: Duration = Duration::from_millis(500);

/// What the sync task and the notice handler share.
pub struct SyncShared {
    /// The directory as it was at the last committed upload.
    pub synced: Mutex<DirSnapshot>,
    pub throughput: Mutex<Throughput>,
    /// Held by whoever uploads: one upload at a time.
    pub upload_lock: tokio::sync::Mutex<()>,
    /// Cancels the background upload in flight, if any.
    in_flight: Mutex<Option<CancellationToken>>,
    paused: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl SyncShared {
    pub fn new(throughput: Throughput) -> SyncShared {
        SyncShared {
            synced: Mutex::new(DirSnapshot::default()),
            throughput: Mutex::new(throughput),
            upload_lock: tokio::sync::Mutex::new(()),
            in_flight: Mutex::new(None),
            paused: std::sync::atomic::AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Stops background work at once: no new sync starts, the one in flight is cancelled.
    pub fn preempt(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(token) = lock(&self.in_flight).take() {
            tracing::info!("notice: cancelling the background sync in flight");
            token.cancel();
        }
    }

    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Looks at the directory now instead of at the next interval (a "prepare" notice).
    pub fn sync_now(&self) {
        self.wake.notify_one();
    }

    pub fn synced(&self) -> DirSnapshot {
        lock(&self.synced).clone()
    }

    pub fn throughput(&self) -> Throughput {
        *lock(&self.throughput)
    }

    /// Records a committed upload of the directory as it was in `snapshot`.
    pub fn record_upload(&self, snapshot: DirSnapshot, bytes_uploaded: u64, seconds: f64) {
        *lock(&self.synced) = snapshot;
        lock(&self.throughput).record(bytes_uploaded, seconds);
    }
}

/// A poisoned lock only means another task panicked mid-update of plain data; keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Settings of the background sync.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub content: Content,
    pub interval: Duration,
    pub concurrency: usize,
    pub part_size: u64,
    pub signal: Signal,
    pub scope: Scope,
    pub rank: Rank,
    pub node: Option<String>,
    pub pod: Option<String>,
}

/// Uploads completed checkpoints until `cancel`.
pub async fn sync_in_background(
    config: SyncConfig,
    store: Store,
    shared: Arc<SyncShared>,
    cancel: CancellationToken,
) {
    let mut previous: Option<DirSnapshot> = None;
    let mut unsynced_since: Option<Instant> = None;
    let mut urgent = false;
    loop {
        let wait = if urgent {
            URGENT_RECHECK
        } else {
            config.interval
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = shared.wake.notified() => urgent = true,
        }
        let content = config.content.clone();
        let Ok(snapshot) = tokio::task::spawn_blocking(move || content.snapshot()).await else {
            continue;
        };
        if snapshot.files.is_empty() || snapshot == shared.synced() {
            unsynced_since = None;
            urgent = false;
            ::metrics::gauge!(metrics::BACKGROUND_SYNC_LAG).set(0.0);
            previous = Some(snapshot);
            continue;
        }
        let since = *unsynced_since.get_or_insert_with(Instant::now);
        ::metrics::gauge!(metrics::BACKGROUND_SYNC_LAG).set(since.elapsed().as_secs_f64());
        let judged = {
            let (config, snapshot, previous) = (config.clone(), snapshot.clone(), previous.clone());
            tokio::task::spawn_blocking(move || {
                judge_periodic(&config, &snapshot, previous.as_ref())
            })
        };
        let completion = judged.await.ok().flatten();
        let Some(completion) = completion.filter(|_| !shared.is_paused()) else {
            previous = Some(snapshot);
            continue;
        };
        previous = Some(snapshot.clone());
        let _guard = shared.upload_lock.lock().await;
        if shared.is_paused() || cancel.is_cancelled() {
            continue;
        }
        let token = cancel.child_token();
        *lock(&shared.in_flight) = Some(token.clone());
        let content = &config.content;
        let options = UploadOptions {
            concurrency: config.concurrency,
            part_size: config.part_size,
            context: ManifestContext {
                notice: None,
                node: config.node.clone(),
                pod: config.pod.clone(),
                step: content.step(completion == Completion::Marker),
            },
            excludes: content.excludes.clone(),
            step_pattern: content.step_pattern.clone(),
            rank: Some(config.rank),
        };
        tracing::info!(
            bytes = snapshot.bytes_not_in(&shared.synced()),
            "background sync of a completed checkpoint"
        );
        let result = upload_generation(&store, &content.dir, &options, &token).await;
        lock(&shared.in_flight).take();
        match result {
            Ok(summary) => {
                tracing::info!(generation = %summary.generation, bytes_uploaded = summary.bytes_uploaded,
                    bytes_reused = summary.bytes_reused, seconds = summary.seconds, "background sync committed");
                let synced = snapshot.without(&summary.left_out);
                shared.record_upload(synced, summary.bytes_uploaded, summary.seconds);
                unsynced_since = None;
                urgent = false;
                ::metrics::gauge!(metrics::BACKGROUND_SYNC_LAG).set(0.0);
                ::metrics::counter!(metrics::BACKGROUND_SYNCS, "outcome" => "committed")
                    .increment(1);
            }
            Err(_) if token.is_cancelled() => {
                tracing::info!("background sync preempted");
                ::metrics::counter!(metrics::BACKGROUND_SYNCS, "outcome" => "preempted")
                    .increment(1);
            }
            Err(error) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(error)), "background sync failed; retrying at the next interval");
                ::metrics::counter!(metrics::BACKGROUND_SYNCS, "outcome" => "failed").increment(1);
            }
        }
    }
}

/// A periodic checkpoint is complete when the directory did not change since the last look,
/// no candidate process writes to it, and either the done marker was written after its files
/// ([`Completion::Marker`]: the marker vouches for the checkpoint, and its step is the one
/// uploaded) or nothing in it is younger than the quiet period and its layout shows it whole
/// ([`checkpoint::judge_quiet_checkpoint`]) (blocking). `None` while it is not.
fn judge_periodic(
    config: &SyncConfig,
    snapshot: &DirSnapshot,
    previous: Option<&DirSnapshot>,
) -> Option<Completion> {
    if previous != Some(snapshot) {
        return None;
    }
    let content = &config.content;
    let marked = MarkerState::read(&content.marker)
        .modified()
        .is_some_and(|marker| snapshot.newest().is_none_or(|newest| marker >= newest));
    let settled = snapshot.newest().is_none_or(|newest| {
        SystemTime::now()
            .duration_since(newest)
            .is_ok_and(|age| age >= content.quiet_period)
    });
    // `--done-marker` makes a notice wait for the marker; periodic saves may not write one.
    if !marked && !settled {
        return None;
    }
    let pids: Vec<i32> = match signal::find_candidates(config.signal, &config.scope) {
        Ok(candidates) => candidates.all().map(|p| p.pid).collect(),
        Err(_) => Vec::new(),
    };
    let target = content.target();
    if !checkpoint::open_for_writing(&target, &pids, &content.excludes).is_empty() {
        return None;
    }
    if marked {
        return Some(Completion::Marker);
    }
    // A periodic save: the trainer is training on, so an unrecognised layout that is quiet and
    // not open for writing counts, as it always has; a recognised one must show it is whole.
    checkpoint::judge_quiet_checkpoint(&target, true).filter(Completion::is_complete)
}
