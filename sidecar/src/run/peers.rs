//! Notices from the job's other pods, for a multi-pod job (world size above 1).
//!
//! A Spot notice reaches one node only, but a distributed checkpoint needs every rank. Two ways
//! bring it to this pod, whichever is first:
//! - the job-wide notice in the store ([`nerve_store::job_notice`]): the sidecar that took the
//!   notice published it; this task polls it every `--peer-poll` with a conditional GET. Errors
//!   back off (doubling up to [`PEER_BACKOFF_MAX`]) and are counted, never fatal. A notice of
//!   this rank's own, one already acted on, one whose deadline passed or one written before the
//!   newest complete generation is ignored;
//! - this trainer's done marker with `reason=notice` that no notice of this sidecar asked for:
//!   the ranks' agreement (an all-reduce at a step boundary) reached the trainer first.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use nerve_store::Store;
use nerve_store::job_notice::{JobNotice, Polled, newest_commit_time, poll_notice};
use nerve_store::step::MarkerContent;
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::checkpoint::MarkerState;
use super::listen::Channel;
use crate::metrics;

/// Longest wait between two polls of the job-wide notice while the store fails: a store down for
/// minutes is polled twice a minute, and the notice is still taken within that when it returns.
pub const PEER_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often this trainer's done marker is looked at: a `stat`, so cheap, and small next to the
/// time the trainers take to agree and save.
pub const MARKER_WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// The window a notice learnt from the done marker is given when nothing says its deadline: a
/// Spot notice's two minutes.
pub const MARKER_NOTICE_WINDOW: time::Duration = time::Duration::seconds(120);

/// Where and how to listen to the other pods.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub store: Store,
    pub rank: u32,
    /// Time between polls of the job-wide notice (`--peer-poll`).
    pub poll: Duration,
    /// This trainer's done marker.
    pub marker: PathBuf,
}

/// A notice another pod took, as this pod learnt it.
#[derive(Debug, Clone)]
pub struct PeerNotice {
    pub notice: JobNotice,
    /// [`Channel::Peer`] (the store) or [`Channel::Marker`] (the trainer's agreement).
    pub channel: Channel,
}

/// Listens until `stop`.
pub async fn listen_to_peers(
    config: PeerConfig,
    notices: mpsc::Sender<PeerNotice>,
    stop: CancellationToken,
) {
    tokio::join!(
        poll_job_notice(&config, &notices, &stop),
        watch_marker(&config, &notices, &stop)
    );
}

async fn poll_job_notice(
    config: &PeerConfig,
    notices: &mpsc::Sender<PeerNotice>,
    stop: &CancellationToken,
) {
    let mut seen_etag: Option<String> = None;
    let mut acted: HashSet<String> = HashSet::new();
    let mut delay = config.poll;
    let mut failures = 0u32;
    loop {
        let jitter = rand::rng().random_range(0.9..1.1);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay.mul_f64(jitter)) => {}
        }
        let polled = poll_notice(&config.store, seen_etag.as_deref()).await;
        let outcome = match polled {
            Ok(Polled::Absent) => "absent",
            Ok(Polled::Unchanged) => "unchanged",
            Ok(Polled::Notice {
                notice,
                etag,
                written,
            }) => {
                seen_etag = Some(etag);
                judge(config, notices, &mut acted, *notice, written).await
            }
            Err(error) => {
                failures += 1;
                // One warning per outage; the rest at debug so an outage does not flood the log.
                if failures == 1 {
                    tracing::warn!(error = %format!("{:#}", anyhow::Error::new(error)),
                        "cannot read the job-wide notice; retrying with backoff (other pods' notices arrive when it is back)");
                }
                ::metrics::counter!(metrics::PEER_POLLS, "outcome" => "error").increment(1);
                delay = (delay * 2).min(PEER_BACKOFF_MAX);
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(failures, "the job-wide notice can be read again");
        }
        failures = 0;
        delay = config.poll;
        ::metrics::counter!(metrics::PEER_POLLS, "outcome" => outcome).increment(1);
    }
}

/// Passes a new job-wide notice on unless it is this rank's own, already acted on, or stale.
async fn judge(
    config: &PeerConfig,
    notices: &mpsc::Sender<PeerNotice>,
    acted: &mut HashSet<String>,
    notice: JobNotice,
    written: OffsetDateTime,
) -> &'static str {
    if notice.rank == config.rank || !acted.insert(notice.id.clone()) {
        return "own";
    }
    let answered_since = match newest_commit_time(&config.store).await {
        Ok(newest) => newest.is_some_and(|newest| written < newest),
        Err(error) => {
            tracing::debug!(%error, "cannot read when the newest generation was committed; taking the notice");
            false
        }
    };
    if answered_since || notice.deadline < OffsetDateTime::now_utc() {
        tracing::info!(id = %notice.id, rank = notice.rank, deadline = %notice.deadline,
            "ignoring a stale job-wide notice (its deadline passed, or a generation was committed since)");
        ::metrics::counter!(metrics::PEER_NOTICES, "outcome" => "stale").increment(1);
        return "stale";
    }
    ::metrics::counter!(metrics::PEER_NOTICES, "outcome" => "taken").increment(1);
    let _ = notices
        .send(PeerNotice {
            notice,
            channel: Channel::Peer,
        })
        .await;
    "notice"
}

/// Passes on a `reason=notice` done marker written since the last look.
async fn watch_marker(
    config: &PeerConfig,
    notices: &mpsc::Sender<PeerNotice>,
    stop: &CancellationToken,
) {
    let mut last = MarkerState::read(&config.marker);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(MARKER_WATCH_INTERVAL) => {}
        }
        let now = MarkerState::read(&config.marker);
        if !now.is_new_since(last) {
            continue;
        }
        last = now;
        let content = MarkerContent::read(&config.marker);
        if !content.is_notice() {
            continue;
        }
        let written = now
            .modified()
            .map_or_else(OffsetDateTime::now_utc, OffsetDateTime::from);
        let notice = JobNotice {
            id: format!("marker/{}", content.step.unwrap_or_default()),
            kind: "agreed-save".to_owned(),
            rank: config.rank,
            node: None,
            deadline: written + MARKER_NOTICE_WINDOW,
            detected_at: written,
            notice: None,
        };
        let _ = notices
            .send(PeerNotice {
                notice,
                channel: Channel::Marker,
            })
            .await;
    }
}
