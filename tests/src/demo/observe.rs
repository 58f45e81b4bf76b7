//! How the demo watches the system from outside, over the same HTTP interfaces an operator
//! would use: readiness probes, the agent's notice stream, Prometheus metrics.

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

/// How often the demo looks at the API server, the store and readiness: fine enough for a
/// timeline in milliseconds, coarse enough to cost nothing.
pub const POLL: Duration = Duration::from_millis(20);
/// One probe or scrape; local servers answer in milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
