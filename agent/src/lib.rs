//! nerve-agent: one per node. Polls the instance metadata service, turns what it sees into
//! notices, streams them to the sidecars on the node, cordons and taints the node in Kubernetes
//! mode, and exports Prometheus metrics.
//!
//! It never blocks anything: it holds no lock on the node, and if it dies the cluster behaves as
//! if it was never installed. It does not checkpoint anything itself (the sidecar does).

pub mod config;
pub mod metrics;
pub mod node;
pub mod server;
pub mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
pub(crate) use nerve_notice::error_chain;
use nerve_notice::{MetadataClient, Notice};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError};
use metrics::Metrics;
use node::NodeActions;
use stream::NoticeStream;

/// Heartbeats go out this often; the contract promises at least every 10 s, so 5 s leaves a
/// subscriber's 10 s read timeout a full interval of slack.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// After shutdown starts, wait this long for in-flight node writes and connections, then go:
/// Kubernetes' default termination grace is 30 s.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Kubernetes API timeouts: an API server that does not answer within these is treated as down
/// and retried, instead of holding a cordon hostage for kube's minutes-long defaults.
const KUBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KUBE_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let metrics = Arc::new(Metrics::new());
    let stream = Arc::new(NoticeStream::new(metrics.clone()));
    let client = MetadataClient::new(&config.metadata_url, config.cloud, config.metadata_timeout)
        .map_err(|err| ConfigError {
        problems: vec![format!("--metadata-url: {err}")],
    })?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", config.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;

    let tracker = TaskTracker::new();
    let (notices_tx, notices_rx) = watch::channel(None);
    if config.acts_on_node() {
        let kube = kube_client(&config).await?;
        let node = config.node_name.clone().unwrap_or_default();
        let actions = NodeActions::new(
            kube,
            node,
            config.cordon_on.clone(),
            config.drain,
            metrics.clone(),
        );
        tracker.spawn(actions.act_on_notices(notices_rx, shutdown.clone()));
    } else if config.kubernetes_enabled() {
        tracing::info!("passive mode: the node is never cordoned, tainted or drained");
    }
    tracing::info!(
        %addr,
        cloud = %config.cloud,
        metadata_url = %config.metadata_url,
        poll_interval = %humantime::format_duration(config.poll_interval),
        kubernetes = config.kubernetes_enabled(),
        passive = config.passive,
        "nerve-agent serving the notice stream, metrics and health"
    );
    tracker.spawn(server::serve(
        listener,
        stream.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(send_heartbeats(
        stream.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    poll_metadata(
        client,
        &stream,
        &metrics,
        notices_tx,
        config.poll_interval,
        &shutdown,
    )
    .await;

    stream.close();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "stopping with work still in flight");
    }
    Ok(())
}

/// Polls the metadata service every `interval` until shutdown; publishes each change to the
/// stream and, once a poll has answered, to the node actions.
async fn poll_metadata(
    mut client: MetadataClient,
    stream: &NoticeStream,
    metrics: &Metrics,
    notices: watch::Sender<Option<Vec<Notice>>>,
    interval: Duration,
    shutdown: &CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    // A slow poll delays the next one instead of causing a burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut answered = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            report = client.poll() => report,
        };
        metrics.poll_finished(report.outcome(), started.elapsed());
        if report.answered && !answered {
            answered = true;
            stream.mark_ready();
            tracing::info!(outcome = report.outcome(), "first metadata poll answered");
        }
        let changes = stream.update(&report.notices);
        for notice in &changes.appeared {
            metrics.notice_seen(notice.kind);
            tracing::info!(
                notice = %notice.to_json(),
                kind = %notice.kind,
                emergency = notice.kind.is_emergency(),
                "notice"
            );
        }
        for notice in &changes.withdrawn {
            tracing::info!(notice = %notice.id, "notice withdrawn");
        }
        if answered {
            notices.send_if_modified(|current| {
                if current.as_deref() == Some(report.notices.as_slice()) {
                    false
                } else {
                    *current = Some(report.notices.clone());
                    true
                }
            });
        }
    }
}

async fn send_heartbeats(
    stream: Arc<NoticeStream>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {
                stream.heartbeat();
                metrics.upkeep();
            }
        }
    }
}

/// The Kubernetes client, configured the usual kube way (in-cluster service account, or
/// KUBECONFIG / ~/.kube/config).
async fn kube_client(config: &Config) -> anyhow::Result<kube::Client> {
    let mut kube_config = kube::Config::infer().await.map_err(|err| ConfigError {
        problems: vec![format!(
            "--kubernetes {}: no cluster configuration found ({}); run in a pod, set KUBECONFIG, \
             or use --kubernetes off",
            if config.kubernetes == config::KubernetesMode::On {
                "on"
            } else {
                "auto"
            },
            error_chain(&err)
        )],
    })?;
    // The agent retries on its own terms, bounded by the notice deadline: node writes back off
    // up to 5 s, evictions honour Retry-After up to 10 s. kube's default layer would retry
    // 429/503/504 inside one call up to 15 times, sleeping any Retry-After in full (an hour if
    // the server says so) or up to 1000 s of backoff, where none of those bounds can act.
    kube_config.default_retry = false;
    kube_config.connect_timeout = Some(KUBE_CONNECT_TIMEOUT);
    kube_config.read_timeout = Some(KUBE_READ_TIMEOUT);
    kube_config.write_timeout = Some(KUBE_READ_TIMEOUT);
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}

/// Now, as an RFC 3339 string (Kubernetes timestamps).
pub(crate) fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
