//! Hearing notices: the agent's watch stream first, the metadata service when the agent is down.
//!
//! The stream (`GET /v1/notices?watch=true`) is NDJSON: a snapshot, then notices, then
//! heartbeats at least every 10 s. A stream that stays silent longer than
//! [`HEARTBEAT_TIMEOUT`] is treated as dead. Reconnects use jittered exponential backoff. While
//! the agent cannot be reached, the metadata service is polled directly with the same client the
//! agent uses. Every notice heard goes to the run loop, which acts on each id once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use nerve_notice::{Cloud, MetadataClient, Notice, StreamEvent};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The agent promises a heartbeat at least every 10 s; three missed ones mean it is gone.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to an agent on the same node takes milliseconds; longer means it is not there.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First reconnect delay: quick, since a restarting agent is back within a second or two.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Reconnect delay cap: the metadata fallback covers the gap, so no need to hammer the agent.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream line longer than this is not a notice; the connection is dropped.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Each metadata request is bounded like the agent's own polls.
pub const METADATA_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a notice was heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Agent,
    Metadata,
    Sigterm,
    /// Another pod of the job took the notice (the job-wide notice in the store).
    Peer,
    /// The ranks' agreement reached this trainer first (its done marker says `reason=notice`).
    Marker,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Agent => "agent",
            Channel::Metadata => "metadata",
            Channel::Sigterm => "sigterm",
            Channel::Peer => "peer",
            Channel::Marker => "marker",
        }
    }
}

/// A notice and where it came from.
#[derive(Debug, Clone)]
pub struct Heard {
    pub notice: Notice,
    pub channel: Channel,
}

/// Where to listen.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Base URL of the agent, e.g. `http://10.0.0.7:9739`.
    pub agent_url: http::Uri,
    pub metadata_url: String,
    pub cloud: Cloud,
    pub poll_interval: Duration,
}

/// Whether notices can currently be heard, for `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct ListenStatus {
    pub agent_connected: AtomicBool,
    pub metadata_answered: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connecting to the agent at {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("connecting to the agent at {0} timed out")]
    ConnectTimeout(String),
    #[error("requesting the notice stream")]
    Http(#[source] hyper::Error),
    #[error("the agent answered {0} to the watch request")]
    Status(http::StatusCode),
    #[error("no line from the agent for {0:?} (heartbeats stopped)")]
    Silent(Duration),
    #[error("the agent closed the stream")]
    Closed,
    #[error("a stream line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("the agent URL {0} has no host; use e.g. http://10.0.0.7:9739")]
    BadUrl(String),
}

/// Listens until `cancel`: the agent stream, with the metadata fallback while it is down.
pub async fn listen_for_notices(
    config: ListenConfig,
    notices: mpsc::Sender<Heard>,
    status: Arc<ListenStatus>,
    cancel: CancellationToken,
) {
    // Assumed up until the first attempt fails: no metadata poll while the stream connects.
    let (agent_up, agent_up_rx) = watch::channel(true);
    let fallback = tokio::spawn(poll_metadata_while_agent_down(
        config.clone(),
        notices.clone(),
        status.clone(),
        agent_up_rx,
        cancel.clone(),
    ));
    let mut backoff = BACKOFF_INITIAL;
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            outcome = follow_stream(&config.agent_url, &notices, &agent_up, &status) => outcome,
        };
        status.agent_connected.store(false, Ordering::Relaxed);
        agent_up.send_replace(false);
        let connected = outcome.connected;
        if connected {
            backoff = BACKOFF_INITIAL;
            failures = 0;
        }
        failures += 1;
        // One warning per outage; the rest at debug so a long outage does not flood the log.
        if failures == 1 {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::new(outcome.error)),
                agent = %config.agent_url, "agent stream unavailable; polling the metadata service until it is back");
        } else {
            tracing::debug!(error = %outcome.error, "agent stream still unavailable");
        }
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    let _ = fallback.await;
}

struct StreamOutcome {
    connected: bool,
    error: StreamError,
}

/// Follows one connection of the watch stream until it fails.
#[tracing::instrument(skip_all, fields(agent = %agent_url))]
async fn follow_stream(
    agent_url: &http::Uri,
    notices: &mpsc::Sender<Heard>,
    agent_up: &watch::Sender<bool>,
    status: &ListenStatus,
) -> StreamOutcome {
    let fail = |connected, error| StreamOutcome { connected, error };
    let mut body = match open_stream(agent_url).await {
        Ok(body) => body,
        Err(error) => return fail(false, error),
    };
    tracing::info!("following the agent's notice stream");
    status.agent_connected.store(true, Ordering::Relaxed);
    agent_up.send_replace(true);
    let mut buffer = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(HEARTBEAT_TIMEOUT, body.frame()).await {
            Err(_) => return fail(true, StreamError::Silent(HEARTBEAT_TIMEOUT)),
            Ok(None) => return fail(true, StreamError::Closed),
            Ok(Some(Err(e))) => return fail(true, StreamError::Http(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line = buffer.split_to(end + 1);
            let line = &line[..end];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<StreamEvent>(line) {
                Ok(StreamEvent::Snapshot { notices: active }) => {
                    for notice in active {
                        send(notices, notice, Channel::Agent).await;
                    }
                }
                Ok(StreamEvent::Notice { notice }) => send(notices, notice, Channel::Agent).await,
                Ok(StreamEvent::Heartbeat) => {}
                Err(error) => {
                    tracing::warn!(%error, line = %String::from_utf8_lossy(line), "ignoring a stream line that is not a notice event");
                }
            }
        }
        if buffer.len() > MAX_LINE_BYTES {
            return fail(true, StreamError::LineTooLong);
        }
    }
}

async fn send(notices: &mpsc::Sender<Heard>, notice: Notice, channel: Channel) {
    // The run loop only goes away at shutdown; a notice then has nowhere to go.
    let _ = notices.send(Heard { notice, channel }).await;
}

/// Connects and sends the watch request; returns the response body.
async fn open_stream(agent_url: &http::Uri) -> Result<hyper::body::Incoming, StreamError> {
    let url = agent_url.to_string();
    let host = agent_url
        .host()
        .ok_or_else(|| StreamError::BadUrl(url.clone()))?;
    let port = agent_url.port_u16().unwrap_or(80);
    let address = format!(
        "{}:{port}",
        host.trim_start_matches('[').trim_end_matches(']')
    );
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&address)).await {
        Err(_) => return Err(StreamError::ConnectTimeout(url)),
        Ok(Err(e)) => return Err(StreamError::Connect(url, e)),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(StreamError::Http)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "agent connection ended");
        }
    });
    let base = agent_url.path().trim_end_matches('/');
    let request = http::Request::get(format!("{base}/v1/notices?watch=true"))
        .header(http::header::HOST, address)
        .header(http::header::ACCEPT, "application/x-ndjson")
        .body(Empty::<Bytes>::new())
        .map_err(|_| StreamError::BadUrl(url.clone()))?;
    let response = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| StreamError::ConnectTimeout(url))?
        .map_err(StreamError::Http)?;
    if !response.status().is_success() {
        return Err(StreamError::Status(response.status()));
    }
    Ok(response.into_body())
}

/// Polls the metadata service every `poll_interval` while the agent stream is down.
async fn poll_metadata_while_agent_down(
    config: ListenConfig,
    notices: mpsc::Sender<Heard>,
    status: Arc<ListenStatus>,
    mut agent_up: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    let mut client = match MetadataClient::new(
        &config.metadata_url,
        config.cloud,
        METADATA_REQUEST_TIMEOUT,
    ) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(url = %error.url, "the metadata URL is not a plain http:// URL; no fallback when the agent is down");
            return;
        }
    };
    loop {
        // Wait while the agent is up.
        while *agent_up.borrow_and_update() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = agent_up.changed() => if changed.is_err() { return },
            }
        }
        let report = tokio::select! {
            _ = cancel.cancelled() => return,
            report = client.poll() => report,
        };
        if report.answered {
            status.metadata_answered.store(true, Ordering::Relaxed);
        }
        for notice in report.notices {
            send(&notices, notice, Channel::Metadata).await;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(config.poll_interval) => {}
            // The agent came back: stop polling at once.
            _ = agent_up.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nerve_notice::NoticeKind;
    use time::OffsetDateTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn notice(kind: NoticeKind, seconds: i64) -> Notice {
        let now = OffsetDateTime::now_utc();
        Notice::new(
            kind,
            "terminate",
            now + time::Duration::seconds(seconds),
            now,
            Cloud::Aws,
        )
    }

    #[tokio::test]
    async fn notices_from_the_snapshot_and_the_stream_arrive_even_when_lines_are_split() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let first = notice(NoticeKind::SpotInterruption, 120);
        let second = notice(NoticeKind::RebalanceRecommendation, 300);
        let snapshot = StreamEvent::Snapshot {
            notices: vec![first.clone()],
        }
        .to_line();
        let later = StreamEvent::Notice {
            notice: second.clone(),
        }
        .to_line();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            // The snapshot line in two pieces, then a heartbeat and a notice in one.
            let (a, b) = snapshot.split_at(snapshot.len() / 2);
            socket.write_all(a.as_bytes()).await.unwrap();
            socket.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            socket.write_all(b.as_bytes()).await.unwrap();
            let rest = format!("{}{later}", StreamEvent::Heartbeat.to_line());
            socket.write_all(rest.as_bytes()).await.unwrap();
            // Keep the stream open, as the agent does.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let (tx, mut rx) = mpsc::channel(8);
        let cancel = CancellationToken::new();
        let config = ListenConfig {
            agent_url: format!("http://{address}").parse().unwrap(),
            metadata_url: "http://127.0.0.1:9".to_string(),
            cloud: Cloud::Aws,
            poll_interval: Duration::from_secs(1),
        };
        let status = Arc::new(ListenStatus::default());
        let task = tokio::spawn(listen_for_notices(
            config,
            tx,
            status.clone(),
            cancel.clone(),
        ));
        let wait = Duration::from_secs(30);
        let got_first = tokio::time::timeout(wait, rx.recv())
            .await
            .unwrap()
            .unwrap();
        let got_second = tokio::time::timeout(wait, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got_first.notice, first);
        assert_eq!(got_first.channel, Channel::Agent);
        assert_eq!(got_second.notice, second);
        assert!(status.agent_connected.load(Ordering::Relaxed));
        cancel.cancel();
        tokio::time::timeout(wait, task).await.unwrap().unwrap();
    }
}
