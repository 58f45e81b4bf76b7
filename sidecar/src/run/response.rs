//! The sidecar's response to a notice: signal the trainer, wait for its checkpoint, upload it
//! and commit it before the deadline. One notice leads to at most one checkpoint, however often
//! it is heard; SIGTERM counts as a notice.
//!
//! Each step is its own function, in the order a notice runs them: [`Runner::signal_trainer`],
//! [`Runner::stop_background_sync`], [`Runner::wait_for_completion`], [`Runner::upload`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nerve_store::job_notice::{JobNotice, publish_notice};
use nerve_store::part::{JobCommit, Rank};
use nerve_store::step::MarkerContent;
use nerve_store::{ManifestContext, Store, UploadOptions, UploadSummary, upload_generation};
use nix::sys::signal::Signal;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{self, Completion, Content, DirSnapshot, MarkerState, Writers};
use super::deadline;
use super::listen::{Channel, Heard};
use super::peers::PeerNotice;
use super::signal::{self, Scope};
use super::sync::SyncShared;
use super::watch::TrainerWatch;
use crate::metrics;

/// Where Kubernetes looks for a container's last words (`kubectl describe pod`).
const TERMINATION_LOG: &str = "/dev/termination-log";

/// How long a notice waits for a preempted background sync to let go of the store; cancelling
/// aborts its multipart uploads, which takes a few requests.
const PREEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long publishing the job-wide notice may delay signalling this pod's own trainer: a PUT
/// to S3 takes tens of milliseconds; a store that does not answer must not cost the trainer
/// its checkpoint (the other ranks still learn from the trainers' agreement).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long past a peer's deadline a rank whose own node stays keeps waiting for its
/// trainer's checkpoint and uploading its part: the generation is only restorable with every
/// part, so it is worth finishing late, but the wait stays bounded.
const PEER_OVERTIME: Duration = Duration::from_secs(600);

/// How far this node's clock (the done marker's time) may be behind the clock that detected
/// the notice (the agent of another node, for a peer's notice) for a marker to still count as
/// written after it: well beyond NTP-synchronised nodes, far below the time between notices.
const PEER_CLOCK_SLACK: time::Duration = time::Duration::seconds(30);

/// What triggered a checkpoint: a notice from the cloud, or SIGTERM.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub id: String,
    pub kind: String,
    pub emergency: bool,
    pub deadline: OffsetDateTime,
    /// When the notice was first seen (by the agent, or by the peer that shared it).
    pub detected_at: OffsetDateTime,
    pub channel: Channel,
    /// This node goes away at the deadline (its own notice, or SIGTERM). A peer's notice is
    /// only aimed at: the part still commits after the deadline, so the generation completes.
    pub local: bool,
    /// What the manifest records.
    pub record: serde_json::Value,
}

impl Trigger {
    pub fn from_notice(heard: &Heard) -> Trigger {
        Trigger {
            id: heard.notice.id.clone(),
            kind: heard.notice.kind.to_string(),
            emergency: heard.notice.kind.is_emergency(),
            deadline: heard.notice.deadline,
            detected_at: heard.notice.detected_at,
            channel: heard.channel,
            local: true,
            record: serde_json::to_value(&heard.notice).unwrap_or_default(),
        }
    }

    /// Another pod's notice (or the ranks' agreement), whose deadline this pod aims at.
    pub fn from_peer(peer: &PeerNotice) -> Trigger {
        let notice = &peer.notice;
        Trigger {
            id: notice.id.clone(),
            kind: notice.kind.clone(),
            emergency: true,
            deadline: notice.deadline,
            detected_at: notice.detected_at,
            channel: peer.channel,
            local: false,
            record: serde_json::to_value(notice).unwrap_or_default(),
        }
    }

    /// SIGTERM, whose deadline is `deadline` (the pod's grace period from when it began).
    pub fn sigterm(deadline: OffsetDateTime) -> Trigger {
        let now = OffsetDateTime::now_utc();
        let format = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        Trigger {
            id: format!("sigterm/{}", format(now)),
            kind: "sigterm".to_string(),
            emergency: true,
            deadline,
            detected_at: now,
            channel: Channel::Sigterm,
            local: true,
            record: serde_json::json!({
                "id": format!("sigterm/{}", format(now)), "kind": "sigterm", "action": "terminate",
                "deadline": format(deadline), "detected_at": format(now), "source": "pod",
            }),
        }
    }
}

/// How a notice's checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointOutcome {
    Committed,
    /// Nothing new on disk since the last committed generation.
    AlreadySafe,
    CutOff,
    /// The checkpoint on disk is torn (its trainer died mid-save): not committed.
    Torn,
    Failed,
}

impl CheckpointOutcome {
    fn as_str(self) -> &'static str {
        match self {
            CheckpointOutcome::Committed => "committed",
            CheckpointOutcome::AlreadySafe => "already-safe",
            CheckpointOutcome::CutOff => "cut-off",
            CheckpointOutcome::Torn => "torn",
            CheckpointOutcome::Failed => "failed",
        }
    }
}

/// What the run loop's responses need to know.
pub struct RunnerConfig {
    pub content: Content,
    pub signal: Signal,
    pub scope: Scope,
    pub concurrency: usize,
    pub part_size: u64,
    pub background_sync: bool,
    pub termination_grace: Duration,
    pub rank: Rank,
    pub node: Option<String>,
    pub pod: Option<String>,
}

impl RunnerConfig {
    fn multi_pod(&self) -> bool {
        self.rank.is_multi_pod()
    }
}

/// The trainer as a notice found it.
struct Signalled {
    writers: Writers,
    notice_to_signal_ms: f64,
}

pub struct Runner {
    pub config: RunnerConfig,
    pub store: Store,
    pub shared: Arc<SyncShared>,
    pub watch: Arc<TrainerWatch>,
    /// Ids of notices already acted on.
    handled: HashSet<String>,
    /// Notice ids by the channel they were heard on (to log a repeat once per channel).
    heard_on: HashSet<(String, &'static str)>,
    /// While an emergency notice's deadline has not passed, another emergency is the same
    /// machine going away (heard through another channel): no second checkpoint.
    pub emergency_until: Option<OffsetDateTime>,
}

impl Runner {
    pub fn new(
        config: RunnerConfig,
        store: Store,
        shared: Arc<SyncShared>,
        watch: Arc<TrainerWatch>,
    ) -> Runner {
        Runner {
            config,
            store,
            shared,
            watch,
            handled: HashSet::new(),
            heard_on: HashSet::new(),
            emergency_until: None,
        }
    }

    pub fn emergency_handled(&self) -> bool {
        self.emergency_until
            .is_some_and(|until| OffsetDateTime::now_utc() < until)
    }

    pub async fn hear(&mut self, heard: Heard) {
        let received = Instant::now();
        let first_on_channel = self
            .heard_on
            .insert((heard.notice.id.clone(), heard.channel.as_str()));
        if !self.handled.insert(heard.notice.id.clone()) {
            if first_on_channel {
                tracing::info!(id = %heard.notice.id, channel = heard.channel.as_str(),
                    "notice heard again; already acted on");
            }
            return;
        }
        let trigger = Trigger::from_notice(&heard);
        ::metrics::counter!(metrics::NOTICES, "kind" => trigger.kind.clone(), "channel" => trigger.channel.as_str())
            .increment(1);
        tracing::warn!(notice = %heard.notice.to_json(), channel = heard.channel.as_str(), "notice");
        if !trigger.emergency {
            if self.config.background_sync {
                tracing::info!(kind = %trigger.kind, "prepare notice: syncing the checkpoint directory now");
                self.shared.sync_now();
            }
            return;
        }
        if self.emergency_handled() {
            tracing::info!(id = %trigger.id, "another emergency notice for a machine already going away; the checkpoint is taken");
            return;
        }
        self.take_checkpoint(trigger, received).await;
    }

    /// Another pod's notice, through the store or through the trainers' agreement.
    pub async fn hear_peer(&mut self, peer: PeerNotice) {
        let received = Instant::now();
        if !self.handled.insert(peer.notice.id.clone()) {
            return;
        }
        if self.emergency_handled() {
            tracing::info!(id = %peer.notice.id, channel = peer.channel.as_str(),
                "another pod's notice while this one is already checkpointing for a notice");
            return;
        }
        let trigger = Trigger::from_peer(&peer);
        ::metrics::counter!(metrics::NOTICES, "kind" => trigger.kind.clone(), "channel" => trigger.channel.as_str())
            .increment(1);
        tracing::warn!(notice = %serde_json::to_string(&peer.notice).unwrap_or_default(),
            channel = peer.channel.as_str(), "notice from another pod of the job");
        self.take_checkpoint(trigger, received).await;
    }

    /// SIGTERM (pod deletion, drain). With the trainer still running it is a notice. With the
    /// trainer gone (a native sidecar is stopped only after the trainer exited) there is nobody
    /// to signal: the newest whole checkpoint on disk is uploaded within what is left of the
    /// grace period, counted from when the trainer was last seen.
    pub async fn hear_sigterm(&mut self) {
        if self.emergency_handled() {
            tracing::info!("SIGTERM: the checkpoint for this notice is already taken; exiting");
            return;
        }
        ::metrics::counter!(metrics::NOTICES, "kind" => "sigterm", "channel" => "sigterm")
            .increment(1);
        let grace = self.config.termination_grace;
        if self
            .watch
            .trainer_running(self.config.signal, &self.config.scope)
        {
            tracing::info!("SIGTERM: treating it as a notice");
            let trigger = Trigger::sigterm(OffsetDateTime::now_utc() + grace);
            self.take_checkpoint(trigger, Instant::now()).await;
        } else {
            let deadline = self.watch.grace_deadline(grace);
            tracing::info!(
                seconds_left = (deadline - OffsetDateTime::now_utc()).as_seconds_f64(),
                "SIGTERM after the trainer exited: saving the newest whole checkpoint on disk"
            );
            self.save_what_is_left(Trigger::sigterm(deadline)).await;
        }
    }

    /// Signal, wait, upload, commit: one checkpoint for `trigger`, heard at `heard`.
    #[tracing::instrument(skip_all, fields(notice = %trigger.id, channel = trigger.channel.as_str()))]
    async fn take_checkpoint(&mut self, trigger: Trigger, heard: Instant) -> CheckpointOutcome {
        self.emergency_until = Some(trigger.deadline.max(OffsetDateTime::now_utc()));
        let deadline = deadline::deadline_instant(trigger.deadline);
        self.shared.preempt();
        // Signal first: every millisecond here is a millisecond less for the upload.
        let marker_before = MarkerState::read(&self.config.content.marker);
        self.publish_to_the_job(&trigger).await;
        // Signalled even when its ranks already saved for this notice: a trainer that does not
        // take part in the agreement must still save, and one that did knows the notice was
        // answered (docs/trainers.md).
        let answered = self.answered_by_the_ranks(&trigger);
        let signalled = self.signal_trainer(&trigger, heard);
        let _guard = self.stop_background_sync().await;
        // A peer's deadline is aimed at; its bound is later, since this node stays.
        let bound = if trigger.local {
            deadline
        } else {
            deadline + PEER_OVERTIME
        };
        let completion = if answered {
            Completion::Marker
        } else {
            self.wait_for_completion(&signalled.writers, marker_before, bound)
                .await
        };
        let outcome = if completion.is_complete() {
            let ms = signalled.notice_to_signal_ms;
            self.upload(&trigger, heard, bound, &completion, ms).await
        } else {
            self.report_not_committed(&trigger, &completion, deadline)
        };
        ::metrics::counter!(metrics::CHECKPOINTS, "outcome" => outcome.as_str()).increment(1);
        outcome
    }

    /// The trainer is gone: upload the newest checkpoint on disk if it is whole and not yet in
    /// the store; nothing to signal, nothing to wait for.
    async fn save_what_is_left(&mut self, trigger: Trigger) -> CheckpointOutcome {
        self.emergency_until = Some(trigger.deadline.max(OffsetDateTime::now_utc()));
        let deadline = deadline::deadline_instant(trigger.deadline);
        self.shared.preempt();
        let _guard = self.stop_background_sync().await;
        let content = self.config.content.clone();
        let synced = self.shared.synced();
        let judged = tokio::task::spawn_blocking(move || {
            let snapshot = content.snapshot();
            if snapshot == synced || snapshot.files.is_empty() {
                return None;
            }
            let marked = MarkerState::read(&content.marker)
                .modified()
                .is_some_and(|m| snapshot.newest().is_none_or(|newest| m >= newest));
            Some(if marked {
                Completion::Marker
            } else {
                // Nobody is left to finish a save: the layout alone decides.
                checkpoint::judge_quiet_checkpoint(&content.target(), false)
                    .unwrap_or(Completion::CutOff)
            })
        })
        .await
        .unwrap_or(None);
        let outcome = match judged {
            None => {
                tracing::info!("the newest checkpoint on disk is already in the store");
                CheckpointOutcome::AlreadySafe
            }
            Some(completion) if completion.is_complete() => {
                self.upload(&trigger, Instant::now(), deadline, &completion, 0.0)
                    .await
            }
            Some(completion) => self.report_not_committed(&trigger, &completion, deadline),
        };
        ::metrics::counter!(metrics::CHECKPOINTS, "outcome" => outcome.as_str()).increment(1);
        outcome
    }

    /// In a multi-pod job, publishes this node's notice for every other pod
    /// ([`nerve_store::job_notice`]), bounded by [`PUBLISH_TIMEOUT`].
    async fn publish_to_the_job(&self, trigger: &Trigger) {
        if !trigger.local || !self.config.multi_pod() {
            return;
        }
        let notice = JobNotice {
            id: trigger.id.clone(),
            kind: trigger.kind.clone(),
            rank: self.config.rank.rank,
            node: self.config.node.clone(),
            deadline: trigger.deadline,
            detected_at: trigger.detected_at,
            notice: Some(trigger.record.clone()),
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish_notice(&self.store, &notice)).await {
            Ok(Ok(())) => {
                tracing::info!(id = %notice.id, "published the notice for the job's other pods")
            }
            Ok(Err(error)) => tracing::warn!(error = %format!("{:#}", anyhow::Error::new(error)),
                "cannot publish the notice for the job's other pods; they learn it from the trainers' agreement"),
            Err(_) => tracing::warn!(
                "publishing the notice for the job's other pods took over {PUBLISH_TIMEOUT:?}; signalling the trainer first"
            ),
        }
    }

    /// In a multi-pod job, whether this trainer already saved for this notice: the ranks agree
    /// on the step to save at their next step boundary, so a rank whose sidecar hears the
    /// notice late (through the store, from a peer) may find its trainer's done marker already
    /// written with `reason=notice` since the notice was detected. Its part is then uploaded at
    /// once, without waiting for another save.
    fn answered_by_the_ranks(&self, trigger: &Trigger) -> bool {
        if !self.config.multi_pod() {
            return false;
        }
        let marker = &self.config.content.marker;
        let written = MarkerState::read(marker).modified();
        let since = trigger.detected_at - PEER_CLOCK_SLACK;
        let fresh = written.is_some_and(|at| OffsetDateTime::from(at) >= since);
        let answered = fresh && MarkerContent::read(marker).is_notice();
        if answered {
            tracing::info!(
                step = MarkerContent::read(marker).step,
                "the ranks already saved for this notice (their agreement reached this trainer first); uploading that checkpoint"
            );
        }
        answered
    }

    /// Sends the signal to the trainer's processes that handle it; says loudly when none does.
    fn signal_trainer(&mut self, trigger: &Trigger, heard: Instant) -> Signalled {
        let config = &self.config;
        let candidates =
            signal::find_candidates(config.signal, &config.scope).unwrap_or_else(|error| {
                tracing::error!(%error, "cannot read /proc to find the trainer");
                signal::Candidates::default()
            });
        let report = signal::signal_trainers(&candidates, config.signal, &config.scope);
        // A peer's notice is timed from its detection on the other node.
        let since = if trigger.local {
            heard.elapsed().as_secs_f64()
        } else {
            (OffsetDateTime::now_utc() - trigger.detected_at).as_seconds_f64()
        };
        ::metrics::histogram!(metrics::NOTICE_TO_SIGNAL, "channel" => trigger.channel.as_str())
            .record(since);
        let notice_to_signal_ms = since * 1000.0;
        if report.signalled.is_empty() {
            ::metrics::counter!(metrics::SIGNALS, "outcome" => "no-handler").increment(1);
            let message = format!(
                "no process {}handles {}: the trainer was not signalled (it would have been killed) \
                 and cannot save a fresh checkpoint; uploading what {} holds. Install a handler in \
                 the trainer (docs/trainers.md) or set --signal/--target/--container",
                config
                    .scope
                    .target
                    .as_ref()
                    .map(|t| format!("matching --target {t} "))
                    .unwrap_or_default(),
                config.signal,
                config.content.dir.display()
            );
            tracing::error!(
                skipped = report.skipped.len(),
                refused = report.refused.len(),
                ambiguous = report.ambiguous,
                "{message}"
            );
            write_termination_message(&message);
        } else {
            ::metrics::counter!(metrics::SIGNALS, "outcome" => "sent")
                .increment(report.signalled.len() as u64);
        }
        Signalled {
            writers: Writers {
                pids: candidates.all().map(|p| p.pid).collect(),
                signalled: report.signalled.iter().map(|p| p.pid).collect(),
            },
            notice_to_signal_ms,
        }
    }

    /// Waits (bounded) for a preempted background sync to let go of the store.
    async fn stop_background_sync(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match tokio::time::timeout(PREEMPT_TIMEOUT, self.shared.upload_lock.lock()).await {
            Ok(guard) => Some(guard),
            Err(_) => {
                tracing::warn!(
                    "background sync did not stop within {PREEMPT_TIMEOUT:?}; uploading alongside it"
                );
                None
            }
        }
    }

    /// Waits until the checkpoint is complete, torn, or too late to upload before `deadline`.
    async fn wait_for_completion(
        &self,
        writers: &Writers,
        marker_before: MarkerState,
        deadline: Instant,
    ) -> Completion {
        let synced = self.shared.synced();
        let throughput = self.shared.throughput();
        let content = self.config.content.clone();
        let now_in_dir = tokio::task::spawn_blocking(move || content.snapshot())
            .await
            .unwrap_or_default();
        let pending = now_in_dir.bytes_not_in(&synced);
        tracing::info!(
            time_left_seconds = deadline::seconds_left(deadline),
            bytes_not_in_store = pending,
            expected_upload_seconds = throughput.time_for(pending).as_secs_f64(),
            throughput_mib_per_second = throughput.bytes_per_second() / (1024.0 * 1024.0),
            "deadline budget before the trainer's checkpoint (the estimate follows it as it grows)"
        );
        let started = Instant::now();
        let completion = checkpoint::wait_for_checkpoint(
            &self.config.content,
            marker_before,
            writers,
            |snapshot: &DirSnapshot| {
                let pending = snapshot.bytes_not_in(&synced);
                ::metrics::gauge!(metrics::DEADLINE_TIME_LEFT)
                    .set(deadline::seconds_left(deadline));
                ::metrics::gauge!(metrics::EXPECTED_UPLOAD)
                    .set(throughput.time_for(pending).as_secs_f64());
                deadline::checkpoint_cutoff(deadline, pending, &throughput)
            },
        )
        .await;
        let waited = started.elapsed().as_secs_f64();
        ::metrics::histogram!(metrics::CHECKPOINT_WAIT).record(waited);
        tracing::info!(
            completion = completion.as_str(),
            waited_seconds = waited,
            "done waiting for the checkpoint"
        );
        completion
    }

    /// Says why nothing was committed, where operators look.
    fn report_not_committed(
        &self,
        trigger: &Trigger,
        completion: &Completion,
        deadline: Instant,
    ) -> CheckpointOutcome {
        let (message, outcome) = match completion {
            Completion::Torn(why) => (
                format!(
                    "{why}; nothing was committed for notice {} and the previous committed \
                     generation stays the one restore picks",
                    trigger.id
                ),
                CheckpointOutcome::Torn,
            ),
            _ => (
                format!(
                    "the checkpoint was not complete {:.1}s before the deadline (left for the \
                     upload at {:.0} MiB/s); nothing was committed for notice {} and the previous \
                     committed generation stays the one restore picks",
                    deadline::seconds_left(deadline),
                    self.shared.throughput().bytes_per_second() / (1024.0 * 1024.0),
                    trigger.id
                ),
                CheckpointOutcome::CutOff,
            ),
        };
        tracing::error!("{message}");
        write_termination_message(&message);
        outcome
    }

    /// Uploads the directory at full speed and commits it, cancelled at `bound` (this node's
    /// deadline, past which the machine is gone anyway; later for a peer's notice).
    async fn upload(
        &self,
        trigger: &Trigger,
        heard: Instant,
        bound: Instant,
        completion: &Completion,
        notice_to_signal_ms: f64,
    ) -> CheckpointOutcome {
        let content = self.config.content.clone();
        let marker_vouches = *completion == Completion::Marker;
        let (snapshot, step) =
            tokio::task::spawn_blocking(move || (content.snapshot(), content.step(marker_vouches)))
                .await
                .unwrap_or_default();
        let cancel = CancellationToken::new();
        let timer = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep_until(bound).await;
                cancel.cancel();
            }
        });
        let options = self.upload_options(trigger, step);
        let dir = &self.config.content.dir;
        let result = upload_generation(&self.store, dir, &options, &cancel).await;
        timer.abort();
        match result {
            Ok(summary) => {
                let synced = snapshot.without(&summary.left_out);
                self.shared
                    .record_upload(synced, summary.bytes_uploaded, summary.seconds);
                report_committed(trigger, &summary, heard, completion, notice_to_signal_ms);
                CheckpointOutcome::Committed
            }
            Err(error) => {
                let message = format!(
                    "uploading the checkpoint for notice {}: {:#}; the previous committed generation stays the one restore picks",
                    trigger.id,
                    anyhow::Error::new(error)
                );
                tracing::error!("{message}");
                write_termination_message(&message);
                CheckpointOutcome::Failed
            }
        }
    }

    /// A notice upload: full concurrency, the notice recorded, this rank's part when multi-pod.
    fn upload_options(&self, trigger: &Trigger, step: Option<u64>) -> UploadOptions {
        UploadOptions {
            concurrency: self.config.concurrency,
            part_size: self.config.part_size,
            context: ManifestContext {
                notice: Some(trigger.record.clone()),
                node: self.config.node.clone(),
                pod: self.config.pod.clone(),
                step,
            },
            excludes: self.config.content.excludes.clone(),
            step_pattern: self.config.content.step_pattern.clone(),
            rank: Some(self.config.rank),
        }
    }
}

/// The figures of a committed notice checkpoint, in the log and the metrics.
fn report_committed(
    trigger: &Trigger,
    summary: &UploadSummary,
    heard: Instant,
    completion: &Completion,
    notice_to_signal_ms: f64,
) {
    let time_to_safe = heard.elapsed().as_secs_f64();
    let margin = (trigger.deadline - OffsetDateTime::now_utc()).as_seconds_f64();
    if summary.rank.is_some() {
        let timing = if margin >= 0.0 { "before" } else { "after" };
        ::metrics::counter!(metrics::PARTS, "timing" => timing).increment(1);
    }
    ::metrics::histogram!(metrics::TIME_TO_SAFE).record(time_to_safe);
    ::metrics::gauge!(metrics::DEADLINE_MARGIN).set(margin);
    tracing::info!(
        generation = %summary.generation,
        step = summary.step,
        rank = summary.rank.map(|r| r.rank),
        job_manifest = summary.job.as_ref().map(JobCommit::as_str),
        parts_committed = summary.job.as_ref().and_then(JobCommit::parts_committed),
        notice_to_signal_ms,
        completion = completion.as_str(),
        upload_seconds = summary.seconds,
        bytes_uploaded = summary.bytes_uploaded,
        bytes_reused = summary.bytes_reused,
        time_to_safe_seconds = time_to_safe,
        deadline_margin_seconds = margin,
        "checkpoint committed"
    );
}

/// Leaves `message` where `kubectl describe pod` shows it, when running in Kubernetes.
pub fn write_termination_message(message: &str) {
    if Path::new(TERMINATION_LOG).exists()
        && let Err(error) = std::fs::write(TERMINATION_LOG, message)
    {
        tracing::debug!(%error, "cannot write {TERMINATION_LOG}");
    }
}
