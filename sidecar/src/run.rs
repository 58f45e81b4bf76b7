//! `nerve-sidecar run`: the long-running sidecar. From a notice to a committed checkpoint.
//!
//! It hears notices from the node agent's stream (or the metadata service when the agent is
//! down, or SIGTERM), signals the trainer, waits for the checkpoint to be complete, uploads it
//! at full speed and commits it, all bounded by the notice's deadline. Before any notice it keeps
//! the store in sync with each completed periodic checkpoint, so that a notice leaves only the
//! new bytes to send. One notice leads to at most one checkpoint, however often it is heard.
//!
//! It does not move bytes itself (that is the store crate, [`nerve_store`]) and never kills a process: a
//! trainer without a handler for the signal is reported, not signalled.

pub mod checkpoint;
pub mod deadline;
pub mod health;
pub mod listen;
pub mod signal;
pub mod sync;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Args};
use metrics_exporter_prometheus::PrometheusBuilder;
use nerve_notice::Cloud;
use nix::sys::signal::Signal;
use regex::Regex;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::checkpoint::{Completion, CompletionRule, DirSnapshot, MarkerState};
use self::deadline::Throughput;
use self::listen::{Channel, Heard, ListenConfig, ListenStatus};
use self::sync::{SyncConfig, SyncShared};
use crate::cli::CheckpointArgs;
use crate::metrics;
use nerve_store::Store;
use nerve_store::{ManifestContext, UploadOptions, upload_generation};

/// Where Kubernetes looks for a container's last words (`kubectl describe pod`).
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Notices waiting for the run loop; the agent sends a handful at most, and a full channel
/// only slows the listener down.
const NOTICE_CHANNEL_CAPACITY: usize = 64;

/// How long a notice waits for a preempted background sync to let go of the store; cancelling
/// aborts its multipart uploads, which takes a few requests.
const PREEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time given to the listener, the sync and the health endpoint to stop after the run loop
/// ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Background sync runs while the trainer trains: a quarter of the notice-time concurrency keeps
/// its disk reads and network use in the background, and still moves a 2 GiB checkpoint in well
/// under a checkpoint period.
const DEFAULT_SYNC_CONCURRENCY: u16 = 4;

/// The port of the agent's notice stream (DESIGN.md).
const AGENT_PORT: u16 = 9739;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,

    /// The node agent's notice stream [default: http://$HOST_IP:9739].
    #[arg(long, env = "NERVE_AGENT_URL", value_parser = parse_http_url)]
    pub agent_url: Option<http::Uri>,

    /// The instance metadata service, polled directly while the agent cannot be reached.
    #[arg(
        long,
        env = "NERVE_METADATA_URL",
        default_value = "http://169.254.169.254"
    )]
    pub metadata_url: String,

    /// Which cloud's metadata service to poll in the fallback: aws, gcp or azure.
    #[arg(long, env = "NERVE_CLOUD", default_value = "aws")]
    pub cloud: Cloud,

    /// Time between metadata polls in the fallback.
    #[arg(long, env = "NERVE_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Signal that asks the trainer to checkpoint; sent only to processes with a handler for it.
    #[arg(long, env = "NERVE_SIGNAL", default_value = "SIGUSR1", value_parser = signal::parse_signal)]
    pub signal: Signal,

    /// Regex on the process command line choosing which processes are the trainer.
    #[arg(long, env = "NERVE_TARGET", value_parser = parse_regex)]
    pub target: Option<Regex>,

    /// File (relative to --dir, or absolute) whose appearance means the checkpoint is complete.
    /// Without it: nothing changed for --quiet-period and no file is open for writing.
    #[arg(long, env = "NERVE_DONE_MARKER")]
    pub done_marker: Option<PathBuf>,

    /// Without a done marker: how long the directory must stay unchanged to count as complete.
    // 5 s spans a trainer's pause between two files (serialising the next tensor) and is small
    // against a two-minute window.
    #[arg(long, env = "NERVE_QUIET_PERIOD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub quiet_period: Duration,

    /// Metrics (/metrics) and health (/healthz, /readyz).
    #[arg(long, env = "NERVE_LISTEN", default_value = "0.0.0.0:9740")]
    pub listen: SocketAddr,

    /// Upload each completed periodic checkpoint in the background before any notice.
    #[arg(long, env = "NERVE_BACKGROUND_SYNC", default_value_t = true, action = ArgAction::Set)]
    pub background_sync: bool,

    /// How often the background sync looks for a new completed checkpoint.
    // Periodic checkpoints come minutes apart; a 10 s lag is small and a directory scan is cheap.
    #[arg(long, env = "NERVE_SYNC_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub sync_interval: Duration,

    /// Requests in flight for background sync (modest: the trainer is still using the disk).
    #[arg(long, env = "NERVE_SYNC_CONCURRENCY", default_value_t = DEFAULT_SYNC_CONCURRENCY,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub sync_concurrency: u16,

    /// Deadline assumed for SIGTERM (pod deletion, drain): the pod's termination grace period.
    #[arg(long, env = "NERVE_TERMINATION_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub termination_grace: Duration,

    /// Upload throughput assumed until one is measured, in bytes per second (e.g. 100MiB).
    #[arg(long, env = "NERVE_ASSUMED_THROUGHPUT", default_value = "100MiB", value_parser = crate::cli::parse_byte_size)]
    pub assumed_throughput: u64,

    /// Node name recorded in the manifest.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Pod name recorded in the manifest.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
}

fn parse_http_url(value: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|_| format!("`{value}` is not a URL; use e.g. http://10.0.0.7:9739"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "`{value}` must be a plain http:// URL with a host, e.g. http://10.0.0.7:9739"
        ));
    }
    Ok(uri)
}

fn parse_regex(value: &str) -> Result<Regex, String> {
    Regex::new(value).map_err(|e| format!("not a valid regex: {e}"))
}

/// What triggered a checkpoint: a notice from the cloud, or SIGTERM.
#[derive(Debug, Clone)]
struct Trigger {
    id: String,
    kind: String,
    emergency: bool,
    deadline: OffsetDateTime,
    channel: Channel,
    /// What the manifest records.
    record: serde_json::Value,
}

impl Trigger {
    fn from_notice(heard: &Heard) -> Trigger {
        Trigger {
            id: heard.notice.id.clone(),
            kind: heard.notice.kind.to_string(),
            emergency: heard.notice.kind.is_emergency(),
            deadline: heard.notice.deadline,
            channel: heard.channel,
            record: serde_json::to_value(&heard.notice).unwrap_or_default(),
        }
    }

    fn sigterm(grace: Duration) -> Trigger {
        let now = OffsetDateTime::now_utc();
        let deadline = now + grace;
        let format = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        Trigger {
            id: format!("sigterm/{}", format(now)),
            kind: "sigterm".to_string(),
            emergency: true,
            deadline,
            channel: Channel::Sigterm,
            record: serde_json::json!({
                "id": format!("sigterm/{}", format(now)), "kind": "sigterm", "action": "terminate",
                "deadline": format(deadline), "detected_at": format(now), "source": "pod",
            }),
        }
    }
}

/// How a notice's checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckpointOutcome {
    Committed,
    CutOff,
    Failed,
}

impl CheckpointOutcome {
    fn as_str(self) -> &'static str {
        match self {
            CheckpointOutcome::Committed => "committed",
            CheckpointOutcome::CutOff => "cut-off",
            CheckpointOutcome::Failed => "failed",
        }
    }
}

/// Runs the sidecar until `shutdown` (SIGTERM), which counts as a notice.
pub async fn command(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    if ::metrics::set_global_recorder(recorder).is_err() {
        tracing::debug!("a metrics recorder is already installed; /metrics shows only its own");
    }
    run(args, handle, shutdown).await
}

/// The run loop, with the Prometheus handle `/metrics` renders.
pub async fn run(
    args: RunArgs,
    metrics_handle: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Every bad setting at once, each with its flag and the fix.
    let dir = args.checkpoint.dir.clone();
    let mut problems = Vec::new();
    if !dir.is_dir() {
        problems.push(format!(
            "--dir {}: not a directory; mount the checkpoint volume there (the trainer writes it)",
            dir.display()
        ));
    }
    let agent_url = match &args.agent_url {
        Some(url) => Some(url.clone()),
        None => default_agent_url().map_err(|e| problems.push(e)).ok(),
    };
    let Some(agent_url) = agent_url.filter(|_| problems.is_empty()) else {
        return Err(crate::ConfigError(problems.join("\n")).into());
    };
    let listener = health::bind(args.listen).await?;
    let address = listener
        .local_addr()
        .context("reading the listening address")?;
    let store = Store::connect(&args.checkpoint.store.config()).await;

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let listen_status = Arc::new(ListenStatus::default());
    let health_state = Arc::new(health::HealthState {
        metrics: metrics_handle,
        listen: listen_status.clone(),
        ready: false.into(),
    });
    tracker.spawn(health::serve_health(
        listener,
        health_state.clone(),
        stop.clone(),
    ));

    let (notices_tx, mut notices) = mpsc::channel(NOTICE_CHANNEL_CAPACITY);
    let listen_config = ListenConfig {
        agent_url: agent_url.clone(),
        metadata_url: args.metadata_url.clone(),
        cloud: args.cloud,
        poll_interval: args.poll_interval,
    };
    tracker.spawn(listen::listen_for_notices(
        listen_config,
        notices_tx,
        listen_status,
        stop.clone(),
    ));

    let shared = Arc::new(SyncShared::new(Throughput::assumed(
        args.assumed_throughput as f64,
    )));
    if args.background_sync {
        let config = SyncConfig {
            dir: dir.clone(),
            interval: args.sync_interval,
            quiet_period: args.quiet_period,
            concurrency: usize::from(args.sync_concurrency),
            part_size: args.checkpoint.transfer.part_size,
            signal: args.signal,
            target: args.target.clone(),
            node: args.node_name.clone(),
            pod: args.pod_name.clone(),
        };
        tracker.spawn(sync::sync_in_background(
            config,
            store.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    tracker.close();
    health_state.ready.store(true, Ordering::Relaxed);
    tracing::info!(%address, agent = %agent_url, dir = %dir.display(), signal = %args.signal,
        background_sync = args.background_sync, "sidecar running");

    let mut runner = Runner {
        marker: args.done_marker.as_ref().map(|m| dir.join(m)),
        dir,
        args,
        store,
        shared,
        handled: HashSet::new(),
        heard_on: HashSet::new(),
        emergency_until: None,
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                if runner.emergency_handled() {
                    tracing::info!("SIGTERM: the checkpoint for this notice is already taken; exiting");
                } else {
                    tracing::info!("SIGTERM: treating it as a notice");
                    let trigger = Trigger::sigterm(runner.args.termination_grace);
                    ::metrics::counter!(metrics::NOTICES, "kind" => "sigterm", "channel" => "sigterm").increment(1);
                    runner.take_checkpoint(trigger, Instant::now()).await;
                }
                break;
            }
            heard = notices.recv() => {
                let Some(heard) = heard else { break };
                runner.hear(heard).await;
            }
            // The deadline passed and the machine is still here (a notice withdrawn, or a
            // false alarm): keep the store in sync again.
            _ = sleep_until_deadline(runner.emergency_until), if runner.emergency_until.is_some() => {
                runner.emergency_until = None;
                tracing::info!("the notice's deadline passed and this machine is still running; background sync resumes");
                runner.shared.resume();
            }
        }
    }
    stop.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

async fn sleep_until_deadline(deadline: Option<OffsetDateTime>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline::deadline_instant(deadline)).await,
        None => std::future::pending().await,
    }
}

fn default_agent_url() -> Result<http::Uri, String> {
    let host = std::env::var("HOST_IP").map_err(|_| {
        "--agent-url is not set and neither is HOST_IP; set HOST_IP from the downward API \
         (status.hostIP) or give --agent-url"
            .to_string()
    })?;
    let url = if host.contains(':') {
        format!("http://[{host}]:{AGENT_PORT}")
    } else {
        format!("http://{host}:{AGENT_PORT}")
    };
    parse_http_url(&url).map_err(|e| format!("HOST_IP: {e}"))
}

struct Runner {
    args: RunArgs,
    dir: PathBuf,
    marker: Option<PathBuf>,
    store: Store,
    shared: Arc<SyncShared>,
    /// Ids of notices already acted on.
    handled: HashSet<String>,
    /// Notice ids by the channel they were heard on (to log a repeat once per channel).
    heard_on: HashSet<(String, &'static str)>,
    /// While an emergency notice's deadline has not passed, another emergency is the same
    /// machine going away (heard through another channel): no second checkpoint.
    emergency_until: Option<OffsetDateTime>,
}

impl Runner {
    fn emergency_handled(&self) -> bool {
        self.emergency_until
            .is_some_and(|until| OffsetDateTime::now_utc() < until)
    }

    async fn hear(&mut self, heard: Heard) {
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
            if self.args.background_sync {
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

    /// Signal, wait, upload, commit: one checkpoint for `trigger`, heard at `heard`.
    #[tracing::instrument(skip_all, fields(notice = %trigger.id, channel = trigger.channel.as_str()))]
    async fn take_checkpoint(&mut self, trigger: Trigger, heard: Instant) -> CheckpointOutcome {
        self.emergency_until = Some(trigger.deadline.max(OffsetDateTime::now_utc()));
        let deadline = deadline::deadline_instant(trigger.deadline);
        self.shared.preempt();

        // Signal first: every millisecond here is a millisecond less for the upload.
        let use_marker = self.marker.clone();
        let marker_before = use_marker.as_deref().map(MarkerState::read);
        let candidates = match signal::find_candidates(self.args.signal, self.args.target.as_ref())
        {
            Ok(candidates) => candidates,
            Err(error) => {
                tracing::error!(%error, "cannot read /proc to find the trainer");
                signal::Candidates::default()
            }
        };
        let report = signal::signal_trainers(&candidates, self.args.signal);
        let signalled = !report.signalled.is_empty();
        ::metrics::histogram!(metrics::NOTICE_TO_SIGNAL).record(heard.elapsed().as_secs_f64());
        let notice_to_signal_ms = heard.elapsed().as_secs_f64() * 1000.0;
        if signalled {
            ::metrics::counter!(metrics::SIGNALS, "outcome" => "sent")
                .increment(report.signalled.len() as u64);
        } else {
            ::metrics::counter!(metrics::SIGNALS, "outcome" => "no-handler").increment(1);
            let message = format!(
                "no process {}handles {}: the trainer was not signalled (it would have been killed) \
                 and cannot save a fresh checkpoint; uploading what {} holds. Install a handler in the \
                 trainer or set --signal/--target",
                self.args
                    .target
                    .as_ref()
                    .map(|t| format!("matching --target {t} "))
                    .unwrap_or_default(),
                self.args.signal,
                self.dir.display()
            );
            tracing::error!(
                skipped = report.skipped.len(),
                refused = report.refused.len(),
                "{message}"
            );
            write_termination_message(&message);
        }

        let _guard = match tokio::time::timeout(PREEMPT_TIMEOUT, self.shared.upload_lock.lock())
            .await
        {
            Ok(guard) => Some(guard),
            Err(_) => {
                tracing::warn!(
                    "background sync did not stop within {PREEMPT_TIMEOUT:?}; uploading alongside it"
                );
                None
            }
        };

        // Wait for the checkpoint. Without a signalled trainer there is no marker to expect.
        let rule = CompletionRule {
            marker: if signalled { use_marker } else { None },
            quiet_period: self.args.quiet_period,
        };
        let writers: Vec<i32> = candidates.all().map(|p| p.pid).collect();
        let synced = self.shared.synced();
        let throughput = self.shared.throughput();
        let scan_dir = self.dir.clone();
        let now_in_dir = tokio::task::spawn_blocking(move || DirSnapshot::scan(&scan_dir))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let pending = now_in_dir.bytes_not_in(&synced);
        tracing::info!(
            time_left_seconds = deadline::seconds_left(deadline),
            bytes_not_in_store = pending,
            expected_upload_seconds = throughput.time_for(pending).as_secs_f64(),
            throughput_mib_per_second = throughput.bytes_per_second() / (1024.0 * 1024.0),
            "deadline budget before the trainer's checkpoint (the estimate follows it as it grows)"
        );
        let wait_started = Instant::now();
        let completion = checkpoint::wait_for_checkpoint(
            &self.dir,
            &rule,
            marker_before.unwrap_or(MarkerState::ABSENT),
            signalled,
            &writers,
            |snapshot: &DirSnapshot| {
                let pending = snapshot.bytes_not_in(&synced);
                let expected = throughput.time_for(pending);
                ::metrics::gauge!(metrics::DEADLINE_TIME_LEFT)
                    .set(deadline::seconds_left(deadline));
                ::metrics::gauge!(metrics::EXPECTED_UPLOAD).set(expected.as_secs_f64());
                deadline::checkpoint_cutoff(deadline, pending, &throughput)
            },
        )
        .await;
        let waited = wait_started.elapsed().as_secs_f64();
        ::metrics::histogram!(metrics::CHECKPOINT_WAIT).record(waited);
        if completion == Completion::CutOff {
            let message = format!(
                "the checkpoint was not complete {:.1}s before the deadline (left for the upload at {:.0} MiB/s); \
                 nothing was committed for notice {} and the previous committed generation stays the one restore picks",
                deadline::seconds_left(deadline),
                throughput.bytes_per_second() / (1024.0 * 1024.0),
                trigger.id
            );
            tracing::error!(waited_seconds = waited, "{message}");
            write_termination_message(&message);
            ::metrics::counter!(metrics::CHECKPOINTS, "outcome" => CheckpointOutcome::CutOff.as_str()).increment(1);
            return CheckpointOutcome::CutOff;
        }
        tracing::info!(
            completion = completion.as_str(),
            waited_seconds = waited,
            "checkpoint complete; uploading"
        );

        // Upload at full speed, bounded by the deadline: past it the machine is gone anyway.
        let dir = self.dir.clone();
        let snapshot = tokio::task::spawn_blocking(move || DirSnapshot::scan(&dir))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let options = UploadOptions {
            concurrency: self.args.checkpoint.transfer.concurrency,
            part_size: self.args.checkpoint.transfer.part_size,
            context: ManifestContext {
                notice: Some(trigger.record.clone()),
                node: self.args.node_name.clone(),
                pod: self.args.pod_name.clone(),
                step: checkpoint::read_training_step(&self.dir),
            },
        };
        let cancel = CancellationToken::new();
        let timer = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep_until(deadline).await;
                cancel.cancel();
            }
        });
        let result = upload_generation(&self.store, &self.dir, &options, &cancel).await;
        timer.abort();
        let outcome = match result {
            Ok(summary) => {
                self.shared
                    .record_upload(snapshot, summary.bytes_uploaded, summary.seconds);
                let time_to_safe = heard.elapsed().as_secs_f64();
                let margin = deadline::seconds_left(deadline);
                ::metrics::histogram!(metrics::TIME_TO_SAFE).record(time_to_safe);
                ::metrics::gauge!(metrics::DEADLINE_MARGIN).set(margin);
                tracing::info!(
                    generation = %summary.generation,
                    step = options.context.step,
                    notice_to_signal_ms,
                    checkpoint_wait_seconds = waited,
                    completion = completion.as_str(),
                    upload_seconds = summary.seconds,
                    bytes_uploaded = summary.bytes_uploaded,
                    bytes_reused = summary.bytes_reused,
                    time_to_safe_seconds = time_to_safe,
                    deadline_margin_seconds = margin,
                    "checkpoint committed"
                );
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
        };
        ::metrics::counter!(metrics::CHECKPOINTS, "outcome" => outcome.as_str()).increment(1);
        outcome
    }
}

/// Leaves `message` where `kubectl describe pod` shows it, when running in Kubernetes.
fn write_termination_message(message: &str) {
    if Path::new(TERMINATION_LOG).exists()
        && let Err(error) = std::fs::write(TERMINATION_LOG, message)
    {
        tracing::debug!(%error, "cannot write {TERMINATION_LOG}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn run_flags_parse_with_defaults() {
        let cli = Cli::try_parse_from([
            "run",
            "--dir",
            "/ckpt",
            "--dest",
            "s3://bucket/prefix",
            "--job",
            "llama",
            "--agent-url",
            "http://10.0.0.7:9739",
            "--target",
            "python.*train",
        ])
        .unwrap();
        assert_eq!(cli.run.signal, Signal::SIGUSR1);
        assert_eq!(cli.run.listen, "0.0.0.0:9740".parse().unwrap());
        assert!(cli.run.background_sync);
        assert_eq!(cli.run.quiet_period, Duration::from_secs(5));
        assert!(cli.run.target.unwrap().is_match("python -m train.py"));
    }

    #[test]
    fn bad_run_flags_name_the_problem() {
        for (flag, value) in [
            ("--agent-url", "https://agent:9739"),
            ("--signal", "SIGKILL"),
            ("--target", "(unclosed"),
            ("--background-sync", "maybe"),
        ] {
            let err = Cli::try_parse_from([
                "run",
                "--dir",
                "/ckpt",
                "--dest",
                "s3://bucket/p",
                "--job",
                "j",
                flag,
                value,
            ])
            .unwrap_err();
            assert!(err.to_string().contains(flag), "{flag}: {err}");
        }
    }
}
