//! The real `nerve-agent` binary as a child process, for end-to-end tests: started against a
//! metadata URL (and optionally the API-server stand-in), read over its HTTP endpoints and its
//! watch stream, killed when dropped.
//!
//! Test support: every helper panics with a message naming what went wrong, because a failed
//! step is a failed test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nerve_notice::StreamEvent;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::apiserver::ApiServer;

/// Pause between checks of a [`wait_for`] condition: short next to any poll interval under test.
const RECHECK: Duration = Duration::from_millis(50);
/// `--metadata-timeout` of every agent under test: well under a second so a hanging metadata
/// service costs few polls.
pub const METADATA_TIMEOUT: Duration = Duration::from_millis(500);

/// A running agent process; killed when dropped.
pub struct AgentProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    wait: Duration,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts the agent polling `metadata_url` every `poll`. With `api`, Kubernetes mode via a
    /// kubeconfig for `node`; without, `--kubernetes off`. `wait` bounds every wait this harness
    /// makes on the agent (ready, an HTTP answer, a stream line). `extra_args` go on the command
    /// line as given.
    pub fn start(
        metadata_url: &str,
        api: Option<&ApiServer>,
        node: &str,
        poll: Duration,
        wait: Duration,
        extra_args: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for the agent");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port for the agent");
        let log = dir.path().join("agent.log");
        let mut command = Command::new(crate::binary_path("nerve-agent"));
        command
            .args(["--metadata-url", metadata_url])
            .args(["--listen", &addr.to_string()])
            .args([
                "--poll-interval",
                &humantime::format_duration(poll).to_string(),
            ])
            .args([
                "--metadata-timeout",
                &humantime::format_duration(METADATA_TIMEOUT).to_string(),
            ])
            .args(extra_args)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_NAME")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log file"));
        match api {
            Some(api) => command
                .env("KUBECONFIG", api.write_kubeconfig(dir.path()))
                .args(["--kubernetes", "on", "--node-name", node]),
            None => command.args(["--kubernetes", "off"]),
        };
        let child = command.spawn().expect("starting nerve-agent");
        Self {
            child,
            addr,
            log,
            wait,
            _dir: dir,
        }
    }

    /// The address the agent's HTTP server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with the log, when the agent process has exited.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("agent process status");
        assert!(status.is_none(), "the agent exited; log:\n{}", self.log());
    }

    /// Waits for `/readyz` to answer 200 (the first metadata poll answered).
    pub async fn wait_ready(&self) {
        let ready = wait_for(self.wait, || async {
            matches!(self.get("/readyz").await, Some((200, _)))
        })
        .await;
        assert!(ready, "agent never became ready; log:\n{}", self.log());
    }

    /// A plain GET on the agent: status and body, or `None` when it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        get(self.addr, path, self.wait).await
    }

    /// The Prometheus text of `/metrics` (empty when the agent does not answer).
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The value of one metric series (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// The active notices of `/v1/notices`; empty until the agent answers (it may still be
    /// starting).
    pub async fn active_notices(&self) -> Vec<Value> {
        let Some((200, body)) = self.get("/v1/notices").await else {
            return Vec::new();
        };
        let value: Value = serde_json::from_str(&body).expect("/v1/notices answers JSON");
        value["notices"]
            .as_array()
            .cloned()
            .expect("/v1/notices has a notices array")
    }

    /// Subscribes to the watch stream; the response headers are already read.
    pub async fn watch(&self) -> Watch {
        let mut tcp = TcpStream::connect(self.addr)
            .await
            .expect("connecting to the agent");
        // HTTP/1.0: the body runs until the server closes, no chunked framing to undo.
        tcp.write_all(b"GET /v1/notices?watch=true HTTP/1.0\r\n\r\n")
            .await
            .expect("sending the watch request");
        let mut reader = BufReader::new(tcp);
        let mut line = String::new();
        loop {
            line.clear();
            reader
                .read_line(&mut line)
                .await
                .expect("reading the watch response headers");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Watch {
            reader,
            wait: self.wait,
        }
    }

    /// Peak resident memory of the agent process so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("agent /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in the agent /proc status")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A watch-stream subscriber.
pub struct Watch {
    reader: BufReader<TcpStream>,
    wait: Duration,
}

impl Watch {
    /// The next event that is not a heartbeat; panics when none comes within the agent's wait.
    pub async fn next(&mut self) -> StreamEvent {
        self.next_within(self.wait)
            .await
            .expect("a stream line in time")
    }

    /// The next line exactly as the agent sent it, heartbeats included. Unbounded: the caller
    /// bounds the wait.
    pub async fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .await
            .expect("reading the watch stream");
        line
    }

    /// The next event that is not a heartbeat, within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<StreamEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
                .await
                .ok()?
                .expect("reading the watch stream");
            assert!(read > 0, "the agent closed the stream");
            let event: StreamEvent =
                serde_json::from_str(line.trim_end()).expect("a stream line is a JSON event");
            if event != StreamEvent::Heartbeat {
                return Some(event);
            }
        }
    }

    /// Waits for the notice with `id`, skipping withdrawals of older ones; returns how long it
    /// took.
    pub async fn expect_notice(&mut self, id: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match self.next_within(left).await {
                Some(StreamEvent::Notice { notice }) if notice.id == id => {
                    return started.elapsed();
                }
                Some(_) => continue,
                None => panic!("notice {id} did not reach the subscriber within {timeout:?}"),
            }
        }
    }
}

/// Checks `condition` until it holds or `timeout` passes; true when it held.
pub async fn wait_for<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(RECHECK).await;
    }
    condition().await
}

/// A plain HTTP/1.0 GET: status and body, or `None` when nothing listens or the answer does not
/// end within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    tokio::time::timeout(timeout, tcp.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The value of one series in Prometheus text (0 when absent).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The notice id the agent gives a spot interruption with `deadline`.
pub fn spot_id(deadline: OffsetDateTime) -> String {
    format!(
        "spot-interruption/{}",
        deadline
            .format(&time::format_description::well_known::Rfc3339)
            .expect("an RFC 3339 deadline")
    )
}
