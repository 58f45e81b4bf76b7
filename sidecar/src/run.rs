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
pub mod peers;
pub mod response;
pub mod signal;
pub mod sync;
pub mod watch;

use std::net::SocketAddr;

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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::checkpoint::Content;
use self::deadline::Throughput;
use self::listen::{ListenConfig, ListenStatus};
use self::peers::PeerConfig;
use self::response::{Runner, RunnerConfig};
use self::signal::Scope;
use self::sync::{SyncConfig, SyncShared};
use self::watch::TrainerWatch;
use crate::settings::{CheckpointArgs, parse_byte_size};
use nerve_store::Store;
use nerve_store::part::Rank;

/// Notices waiting for the run loop; the agent sends a handful at most, and a full channel
/// only slows the listener down.
const NOTICE_CHANNEL_CAPACITY: usize = 64;

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

    /// The trainer's container: only processes whose environment holds NERVE_CONTAINER with
    /// this value are signalled (the injector sets it in the trainer container).
    #[arg(long, env = "NERVE_CONTAINER")]
    pub container: Option<String>,

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

    /// In a multi-pod job: how often the job-wide notice in the store is polled, so that a
    /// notice received by another pod's node reaches this one (a conditional GET; see
    /// docs/DESIGN.md for the cost).
    // 2 s: other ranks start their checkpoint within ~2.5 s of the notice, a small part of a
    // two-minute window, for 43,200 GETs a day per pod.
    #[arg(long, env = "NERVE_PEER_POLL", default_value = "2s", value_parser = parse_peer_poll)]
    pub peer_poll: Duration,

    /// Deadline assumed for SIGTERM (pod deletion, drain): the pod's termination grace period.
    #[arg(long, env = "NERVE_TERMINATION_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub termination_grace: Duration,

    /// Upload throughput assumed until one is measured, in bytes per second (e.g. 100MiB).
    #[arg(long, env = "NERVE_ASSUMED_THROUGHPUT", default_value = "100MiB", value_parser = parse_byte_size)]
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

/// Shortest and longest peer poll: below 200 ms the GETs cost more than they save; above a
/// minute half the notice window is gone before the other ranks hear it.
fn parse_peer_poll(value: &str) -> Result<Duration, String> {
    let poll = humantime::parse_duration(value)
        .map_err(|e| format!("`{value}` is not a duration like 2s: {e}"))?;
    if (Duration::from_millis(200)..=Duration::from_secs(60)).contains(&poll) {
        Ok(poll)
    } else {
        Err(format!("must be between 200ms and 60s, got {value}"))
    }
}

fn parse_regex(value: &str) -> Result<Regex, String> {
    Regex::new(value).map_err(|e| format!("not a valid regex: {e}"))
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
    let checked = check_settings(&args)?;
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
    let mut started = start_tasks(&args, checked, store, listen_status, &tracker, &stop);
    tracker.close();
    health_state.ready.store(true, Ordering::Relaxed);
    tracing::info!(%address, agent = %started.agent_url, dir = %args.checkpoint.dir.display(),
        signal = %args.signal, background_sync = args.background_sync, "sidecar running");
    respond_until_stopped(
        &mut started.runner,
        &mut started.notices,
        &mut started.peer_notices,
        &shutdown,
    )
    .await;
    stop.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

/// The settings `run` needs that parsing could not check, all checked at once.
struct Checked {
    agent_url: http::Uri,
    scope: Scope,
    rank: Rank,
}

/// Every bad setting at once, each with its flag and the fix (exit 64).
fn check_settings(args: &RunArgs) -> Result<Checked, crate::ConfigError> {
    let dir = &args.checkpoint.dir;
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
    let scope = Scope {
        target: args.target.clone(),
        container: args.container.clone(),
    };
    if let Err(problem) = scope.check() {
        problems.push(problem);
    }
    let rank = args
        .checkpoint
        .rank
        .resolve()
        .map_err(|e| problems.push(e.0))
        .ok();
    match (agent_url, rank, problems.is_empty()) {
        (Some(agent_url), Some(rank), true) => Ok(Checked {
            agent_url,
            scope,
            rank,
        }),
        _ => Err(crate::ConfigError(problems.join("\n"))),
    }
}

/// The running sidecar: the responder and the channels its listeners feed.
struct Started {
    agent_url: http::Uri,
    runner: Runner,
    notices: mpsc::Receiver<listen::Heard>,
    peer_notices: mpsc::Receiver<peers::PeerNotice>,
}

/// Starts the listeners, the background sync, the peer poller and the trainer watch.
fn start_tasks(
    args: &RunArgs,
    checked: Checked,
    store: Store,
    listen_status: Arc<ListenStatus>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Started {
    let Checked {
        agent_url,
        scope,
        rank,
    } = checked;
    let (notices_tx, notices) = mpsc::channel(NOTICE_CHANNEL_CAPACITY);
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
    let content = content_of(args);
    let shared = Arc::new(SyncShared::new(Throughput::assumed(
        args.assumed_throughput as f64,
    )));
    if args.background_sync {
        let config = SyncConfig {
            content: content.clone(),
            interval: args.sync_interval,
            concurrency: usize::from(args.sync_concurrency),
            part_size: args.checkpoint.transfer.part_size,
            signal: args.signal,
            scope: scope.clone(),
            rank,
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
    let (peer_tx, peer_notices) = mpsc::channel(NOTICE_CHANNEL_CAPACITY);
    if rank.is_multi_pod() {
        let config = PeerConfig {
            store: store.clone(),
            rank: rank.rank,
            poll: args.peer_poll,
            marker: content.marker.clone(),
        };
        tracker.spawn(peers::listen_to_peers(config, peer_tx, stop.clone()));
    }
    let watch = Arc::new(TrainerWatch::default());
    tracker.spawn(
        watch
            .clone()
            .watch(args.signal, scope.clone(), stop.clone()),
    );
    let config = RunnerConfig {
        content,
        signal: args.signal,
        scope,
        concurrency: args.checkpoint.transfer.concurrency,
        part_size: args.checkpoint.transfer.part_size,
        background_sync: args.background_sync,
        termination_grace: args.termination_grace,
        rank,
        node: args.node_name.clone(),
        pod: args.pod_name.clone(),
    };
    Started {
        agent_url,
        runner: Runner::new(config, store, shared, watch),
        notices,
        peer_notices,
    }
}

/// What under `--dir` is the checkpoint, from the flags.
fn content_of(args: &RunArgs) -> Content {
    let dir = &args.checkpoint.dir;
    let content_args = &args.checkpoint.content;
    Content {
        marker: content_args.marker_path(dir),
        marker_only: content_args.done_marker.is_some(),
        dir: dir.clone(),
        quiet_period: args.quiet_period,
        excludes: content_args.excludes(),
        step_pattern: content_args.step_from.clone(),
    }
}

/// Responds to notices (this node's, other pods', SIGTERM) until SIGTERM has been answered or
/// the listeners stop.
async fn respond_until_stopped(
    runner: &mut Runner,
    notices: &mut mpsc::Receiver<listen::Heard>,
    peer_notices: &mut mpsc::Receiver<peers::PeerNotice>,
    shutdown: &CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                runner.hear_sigterm().await;
                return;
            }
            heard = notices.recv() => {
                let Some(heard) = heard else { return };
                runner.hear(heard).await;
            }
            Some(peer) = peer_notices.recv() => runner.hear_peer(peer).await,
            // The deadline passed and the machine is still here (a notice withdrawn, or a
            // false alarm): keep the store in sync again.
            _ = sleep_until_deadline(runner.emergency_until), if runner.emergency_until.is_some() => {
                runner.emergency_until = None;
                tracing::info!("the notice's deadline passed and this machine is still running; background sync resumes");
                runner.shared.resume();
            }
        }
    }
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
