//! An HTTP proxy that sits in front of a real server and fails chosen requests the way networks
//! and stores fail: a 500 or a 503 SlowDown answer, a 400 refusal, a connection reset in the
//! middle of a request body, a stall, an answer lost after the server acted on the request, or
//! flipped bytes in the body on its way to the server.
//!
//! It speaks HTTP/1.1 at the byte level (it reads the request head, then copies the body by
//! Content-Length), so what reaches the server is exactly what the client sent, SigV4 intact.
//! A [`Rule`] picks requests by method, a substring of the path-and-query and a substring of a
//! header name, and applies to the next `times` matching requests (or all of them). Runs on its own thread and runtime;
//! dropping the [`FaultProxy`] stops it.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Longest request head we accept; S3 request heads are a few KiB.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What to do to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `500 InternalError` without forwarding (the body is drained first).
    InternalError,
    /// Answer `503 SlowDown` without forwarding (the body is drained first).
    SlowDown,
    /// Answer `400 InvalidArgument` without forwarding (the body is drained first), as a store
    /// does to a header it does not support.
    InvalidArgument,
    /// Forward half the body, then reset both connections.
    ResetMidBody,
    /// Hold the request without answering for this long, then drop the connection.
    Stall(Duration),
    /// Forward the whole request and read the server's whole answer, then close the client's
    /// connection without passing the answer on: the server acted, the client never hears so.
    DropResponse,
    /// Flip one byte in the middle of the body on its way to the server.
    Corrupt,
    /// Hold the request this long, then forward it as usual (a slow store).
    Delay(Duration),
}

/// Which requests a fault applies to, and how many times.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `PUT`, `GET`, ... or `None` for any.
    pub method: Option<String>,
    /// Substring of the path and query (`partNumber=`, `uploads`, a key), or `None` for any.
    pub path_contains: Option<String>,
    /// Substring of a header name the request must carry (case-insensitive), or `None`.
    pub header_contains: Option<String>,
    pub fault: Fault,
    /// Matching requests still to fail; `None` for every one.
    pub times: Option<usize>,
}

impl Rule {
    pub fn new(fault: Fault) -> Rule {
        Rule {
            method: None,
            path_contains: None,
            header_contains: None,
            fault,
            times: None,
        }
    }

    pub fn method(mut self, method: &str) -> Rule {
        self.method = Some(method.to_owned());
        self
    }

    pub fn path_contains(mut self, needle: &str) -> Rule {
        self.path_contains = Some(needle.to_owned());
        self
    }

    /// Only requests carrying a header whose name contains `needle` (e.g. `checksum`).
    pub fn header_contains(mut self, needle: &str) -> Rule {
        self.header_contains = Some(needle.to_ascii_lowercase());
        self
    }

    pub fn times(mut self, times: usize) -> Rule {
        self.times = Some(times);
        self
    }

    fn matches(&self, request: &Head) -> bool {
        self.times != Some(0)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&request.method))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|n| request.target.contains(n))
            && self
                .header_contains
                .as_deref()
                .is_none_or(|n| request.header_names.iter().any(|h| h.contains(n)))
    }
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    /// Requests failed so far, by fault.
    injected: Vec<(Fault, String, String)>,
    forwarded: usize,
}

/// A running proxy. Stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nerve-fault-proxy")
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shutdown = CancellationToken::new();
        let (stop, shared) = (shutdown.clone(), state.clone());
        let thread = std::thread::Builder::new()
            .name("nerve-fault-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    accept_loop(listener, upstream, shared, stop).await;
                });
            })?;
        Ok(FaultProxy {
            addr,
            state,
            shutdown,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule; rules are tried in the order added, first match wins.
    pub fn add_rule(&self, rule: Rule) {
        lock(&self.state).rules.push(rule);
    }

    pub fn clear_rules(&self) {
        lock(&self.state).rules.clear();
    }

    /// Faults injected so far, as `(fault, method, path-and-query)`.
    pub fn injected(&self) -> Vec<(Fault, String, String)> {
        lock(&self.state).injected.clone()
    }

    /// Requests passed through untouched so far.
    pub fn forwarded(&self) -> usize {
        lock(&self.state).forwarded
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let client = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let (state, stop) = (state.clone(), stop.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = serve_connection(client, upstream, state) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    tracker.close();
}

/// One client connection: requests in sequence, each forwarded on one upstream connection.
async fn serve_connection(
    client: TcpStream,
    upstream_addr: SocketAddr,
    state: Arc<Mutex<State>>,
) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let (client_read, mut client_write) = client.into_split();
    let mut client_read = BufReader::new(client_read);
    let upstream = TcpStream::connect(upstream_addr).await?;
    let _ = upstream.set_nodelay(true);
    let (upstream_read, mut upstream_write) = upstream.into_split();
    let mut upstream_read = BufReader::new(upstream_read);
    loop {
        let Some(head) = read_head(&mut client_read).await? else {
            return Ok(());
        };
        let request = Head::parse(&head)?;
        let fault = {
            let mut state = lock(&state);
            let fault = state
                .rules
                .iter_mut()
                .find(|r| r.matches(&request))
                .map(|rule| {
                    if let Some(times) = rule.times.as_mut() {
                        *times -= 1;
                    }
                    rule.fault
                });
            match fault {
                Some(fault) => {
                    state
                        .injected
                        .push((fault, request.method.clone(), request.target.clone()))
                }
                None => state.forwarded += 1,
            }
            fault
        };
        let body_len = request.content_length;
        match fault {
            Some(Fault::InternalError | Fault::SlowDown | Fault::InvalidArgument) => {
                drain(
                    &mut client_read,
                    body_len,
                    request.expect_continue,
                    &mut client_write,
                )
                .await?;
                let (status, code) = match fault {
                    Some(Fault::SlowDown) => ("503 Slow Down", "SlowDown"),
                    Some(Fault::InvalidArgument) => ("400 Bad Request", "InvalidArgument"),
                    _ => ("500 Internal Server Error", "InternalError"),
                };
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                     <Message>injected by the fault proxy</Message></Error>"
                );
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                client_write.write_all(response.as_bytes()).await?;
                continue;
            }
            Some(Fault::Stall(duration)) => {
                tokio::time::sleep(duration).await;
                return Ok(());
            }
            Some(Fault::Delay(duration)) => tokio::time::sleep(duration).await,
            _ => {}
        }
        upstream_write.write_all(&head).await?;
        let mut remaining = body_len;
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        if request.expect_continue {
            // Pass the server's "100 Continue" (or its early answer) back before the body.
            let interim = read_head(&mut upstream_read).await?;
            let Some(interim) = interim else {
                return Ok(());
            };
            client_write.write_all(&interim).await?;
            if !interim.starts_with(b"HTTP/1.1 100") {
                continue;
            }
        }
        while remaining > 0 {
            let want = usize::try_from(remaining.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = client_read.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok(());
            }
            if fault == Some(Fault::ResetMidBody) && sent + n as u64 >= body_len / 2 {
                // Dropping both halves with unsent data makes the kernel send RST.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "injected reset",
                ));
            }
            if fault == Some(Fault::Corrupt) {
                let middle = body_len / 2;
                if middle >= sent && middle < sent + n as u64 {
                    let index = usize::try_from(middle - sent).unwrap_or(0);
                    buf[index] ^= 0xff;
                }
            }
            upstream_write.write_all(&buf[..n]).await?;
            sent += n as u64;
            remaining -= n as u64;
        }
        if fault == Some(Fault::DropResponse) {
            // Wait for the whole answer, so the server has finished acting on the request.
            copy_response(&mut upstream_read, &mut tokio::io::sink(), &request.method).await?;
            return Ok(());
        }
        copy_response(&mut upstream_read, &mut client_write, &request.method).await?;
    }
}

struct Head {
    method: String,
    target: String,
    /// Lower-case header names.
    header_names: Vec<String>,
    content_length: u64,
    expect_continue: bool,
}

impl Head {
    fn parse(head: &[u8]) -> io::Result<Head> {
        let text = std::str::from_utf8(head).map_err(|_| bad("request head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let mut content_length = 0;
        let mut expect_continue = false;
        let mut chunked = false;
        let mut header_names = Vec::new();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            header_names.push(name.trim().to_ascii_lowercase());
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().map_err(|_| bad("bad Content-Length"))?;
            } else if name.eq_ignore_ascii_case("expect") {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        if chunked {
            return Err(bad(
                "chunked request bodies are not supported by the fault proxy",
            ));
        }
        Ok(Head {
            method,
            target,
            header_names,
            content_length,
            expect_continue,
        })
    }
}

fn bad(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Reads up to and including the blank line ending an HTTP head; `None` at a clean EOF.
async fn read_head<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = reader.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(bad("connection closed inside a head"))
            };
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(bad("head too long"));
        }
    }
}

async fn drain<R: AsyncReadExt + Unpin, W: AsyncWriteExt + Unpin>(
    reader: &mut R,
    len: u64,
    expect_continue: bool,
    writer: &mut W,
) -> io::Result<()> {
    if expect_continue {
        // Like a real server answering early: the client sends no body.
        let _ = writer;
        return Ok(());
    }
    tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    Ok(())
}

/// Copies one response (head plus a Content-Length or chunked body) back to the client.
async fn copy_response<R, W>(upstream: &mut R, client: &mut W, method: &str) -> io::Result<()>
where
    R: AsyncBufReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let head = read_head(upstream)
        .await?
        .ok_or_else(|| bad("server closed before answering"))?;
    client.write_all(&head).await?;
    let text = String::from_utf8_lossy(&head).to_string();
    let mut content_length = None;
    let mut chunked = false;
    for line in text.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    if method.eq_ignore_ascii_case("HEAD") {
        return client.flush().await;
    }
    if chunked {
        loop {
            let mut size_line = Vec::new();
            upstream.read_until(b'\n', &mut size_line).await?;
            client.write_all(&size_line).await?;
            let size_text = String::from_utf8_lossy(&size_line);
            let size = u64::from_str_radix(size_text.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers (usually none) end with a blank line.
                let trailer = read_head(upstream).await?.unwrap_or_default();
                client.write_all(&trailer).await?;
                break;
            }
            tokio::io::copy(&mut (&mut *upstream).take(size + 2), client).await?;
        }
    } else if let Some(len) = content_length {
        tokio::io::copy(&mut (&mut *upstream).take(len), client).await?;
    }
    client.flush().await
}
