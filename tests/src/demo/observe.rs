//! How the demo watches the system from outside, over the same interfaces an operator would
//! use: readiness probes, the agents' notice streams, Prometheus metrics, and what the trainers
//! and sidecars print, all arriving as [`Seen`] lines timed as read.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nerve_notice::StreamEvent;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// How often the demo looks at the API server, the store and readiness: fine enough for a
/// timeline in milliseconds, coarse enough to cost nothing.
pub const POLL: Duration = Duration::from_millis(20);
/// One probe or scrape; local servers answer in milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The `event` of the line a watched output gets last, once it has ended (the child exited).
pub const CLOSED: &str = "nerve-demo:closed";
/// Lines the demo can fall behind by: a few hundred lines at most arrive in a second (every
/// process's startup banner, each rank's events); a relay never waits for the demo.
pub const SEEN_BUFFER: usize = 1024;

/// What printed a line: rank or node `n`'s trainer, sidecar, or agent (its notice stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Trainer(usize),
    Sidecar(usize),
    Agent(usize),
}

/// One JSON line of a watched output (a trainer event, a sidecar log line, a streamed notice),
/// with the moment it was read.
#[derive(Debug)]
pub struct Seen {
    pub source: Source,
    pub at: Instant,
    pub value: Value,
}

impl Seen {
    /// A trainer event's name.
    pub fn event(&self) -> &str {
        self.value["event"].as_str().unwrap_or_default()
    }

    /// A JSON log line's message.
    pub fn message(&self) -> &str {
        self.value["fields"]["message"].as_str().unwrap_or_default()
    }
}

/// The next trainer event `event` from a source `from` accepts, within `timeout`. A trainer's
/// `error` event, or the end of the output of a source `from` accepts, fails the wait.
pub async fn next_event(
    seen: &mut mpsc::Receiver<Seen>,
    event: &str,
    timeout: Duration,
    from: impl Fn(Source) -> bool,
) -> anyhow::Result<Seen> {
    let wait = async {
        while let Some(line) = seen.recv().await {
            if !from(line.source) {
                continue;
            }
            match line.event() {
                "error" => bail!("the trainer reported: {}", line.value["message"]),
                CLOSED => bail!("the trainer exited before printing `{event}` (see its log)"),
                name if name == event => return Ok(line),
                _ => {}
            }
        }
        bail!("every watched output ended before `{event}`")
    };
    tokio::time::timeout(timeout, wait)
        .await
        .with_context(|| format!("the trainer did not print `{event}` within {timeout:?}"))?
}

/// Passes every notice node `node`'s agent streams on to `seen`, until the stream ends or the
/// handle is dropped.
pub fn forward_notices(
    mut stream: NoticeStream,
    node: usize,
    seen: mpsc::Sender<Seen>,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        while let Ok(notice) = stream.next_notice().await {
            let line = Seen {
                source: Source::Agent(node),
                at: Instant::now(),
                value: notice,
            };
            if seen.send(line).await.is_err() {
                return;
            }
        }
    }))
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(url: &str) -> anyhow::Result<hyper::Response<Incoming>> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("parsing {url}"))?;
    tokio::time::timeout(REQUEST_TIMEOUT, client().get(uri))
        .await
        .with_context(|| format!("GET {url} timed out"))?
        .with_context(|| format!("GET {url}"))
}

/// Waits until `url` answers 200.
pub async fn wait_ready(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(response) = get(url).await
            && response.status().is_success()
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{url} did not answer 200 within {timeout:?}");
        }
        tokio::time::sleep(POLL * 5).await;
    }
}

/// A Prometheus text page.
pub async fn scrape(url: &str) -> anyhow::Result<String> {
    let body = get(url).await?.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The sum of every sample of `metric` (exact name) whose labels contain `label_value`.
pub fn sum(page: &str, metric: &str, label_value: Option<&str>) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once('}')?,
                None => ("", rest),
            };
            if !value.starts_with(' ') {
                return None;
            }
            if let Some(wanted) = label_value
                && !labels.contains(&format!("\"{wanted}\""))
            {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The agent's watch stream, read as a sidecar reads it.
pub struct NoticeStream {
    body: Incoming,
    buffer: BytesMut,
    pending: Vec<Value>,
}

impl NoticeStream {
    pub async fn connect(agent_url: &str) -> anyhow::Result<Self> {
        let response = get(&format!("{agent_url}/v1/notices?watch=true")).await?;
        if !response.status().is_success() {
            bail!("the agent's watch stream answered {}", response.status());
        }
        Ok(Self {
            body: response.into_body(),
            buffer: BytesMut::new(),
            pending: Vec::new(),
        })
    }

    /// The next notice on the stream (from the snapshot or a notice line), as JSON.
    pub async fn next_notice(&mut self) -> anyhow::Result<Value> {
        loop {
            if let Some(notice) = self.pending.pop() {
                return Ok(notice);
            }
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                let event: StreamEvent = serde_json::from_slice(&line[..end])
                    .context("parsing a line of the agent's watch stream")?;
                match event {
                    StreamEvent::Snapshot { notices } => {
                        self.pending
                            .extend(notices.into_iter().rev().map(|n| notice_json(&n)));
                    }
                    StreamEvent::Notice { notice } => self.pending.push(notice_json(&notice)),
                    StreamEvent::Heartbeat => {}
                }
                continue;
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(mut data) = frame.context("reading the watch stream")?.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buffer.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
                None => bail!("the agent closed its watch stream"),
            }
        }
    }
}

fn notice_json(notice: &nerve_notice::Notice) -> Value {
    serde_json::from_str(&notice.to_json()).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_adds_matching_samples_only() {
        let page = "# HELP x\n\
                    nerve_sidecar_transfer_bytes_total{direction=\"upload\"} 100\n\
                    nerve_sidecar_transfer_bytes_total{direction=\"download\"} 7\n\
                    nerve_sidecar_transfer_bytes_total_other 5\n\
                    nerve_sidecar_upload_duration_seconds_sum 1.5\n";
        assert_eq!(
            sum(page, "nerve_sidecar_transfer_bytes_total", Some("upload")),
            100.0
        );
        assert_eq!(sum(page, "nerve_sidecar_transfer_bytes_total", None), 107.0);
        assert_eq!(
            sum(page, "nerve_sidecar_upload_duration_seconds_sum", None),
            1.5
        );
    }
}
