//! HTTP on `--listen`: the notice stream, metrics and health.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::stream::{MAX_SUBSCRIBERS, MAX_SUBSCRIBERS_PER_PEER, NoticeStream};

/// Open connections at most: every subscriber holds one, plus room for scrapes and probes.
const MAX_CONNECTIONS: usize = MAX_SUBSCRIBERS + 64;

/// Open connections from one address at most: its watch streams plus room for its scrapes and
/// probes. Without it, one client holding idle connections could take every slot of
/// [`MAX_CONNECTIONS`] and the sidecars on the node could not even connect.
const MAX_CONNECTIONS_PER_PEER: usize = MAX_SUBSCRIBERS_PER_PEER + 32;

/// Sent, best effort, on a connection refused for [`MAX_CONNECTIONS_PER_PEER`] before closing
/// it, so the client logs a reason instead of a reset.
const TOO_MANY_CONNECTIONS: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
connection: close\r\ncontent-length: 46\r\n\r\ntoo many connections from this address; retry\n";

/// A client must send its request headers within this time (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

type Body = Either<Full<Bytes>, WatchBody>;

/// Serves until `shutdown`, then stops accepting; open watch streams end when the stream closes.
pub async fn serve(
    listener: TcpListener,
    stream: Arc<NoticeStream>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_peer = PeerConnections::default();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(peer_slot) = per_peer.claim(peer.ip()) else {
            // Debug, not warn: a client that reconnects in a loop must not flood the log.
            tracing::debug!(
                %peer,
                limit = MAX_CONNECTIONS_PER_PEER,
                "too many connections from one address; refusing this one"
            );
            let _ = tcp.try_write(TOO_MANY_CONNECTIONS);
            continue;
        };
        let stream = stream.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = service_fn(move |request| {
                let response = route(&request, peer.ip(), &stream, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(peer_slot);
            drop(permit);
        });
    }
    tracker.close();
    // Watch bodies end when the stream is closed; other requests are short.
    tracker.wait().await;
}

/// Connections open per client address.
#[derive(Clone, Default)]
struct PeerConnections(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open connection of a peer; gives its slot back when dropped.
struct PeerSlot {
    peers: PeerConnections,
    peer: IpAddr,
}

impl PeerConnections {
    fn claim(&self, peer: IpAddr) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(peer).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

fn route(
    request: &Request<Incoming>,
    peer: IpAddr,
    stream: &NoticeStream,
    metrics: &Metrics,
) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
    }
    match request.uri().path() {
        "/v1/notices" => {
            let watch = request.uri().query().is_some_and(|query| {
                query
                    .split('&')
                    .any(|pair| pair == "watch=true" || pair == "watch=1")
            });
            if watch {
                match stream.subscribe(peer) {
                    Ok(rx) => {
                        let mut response = respond(
                            StatusCode::OK,
                            "application/x-ndjson",
                            Either::Right(WatchBody(rx)),
                        );
                        response.headers_mut().insert(
                            header::CACHE_CONTROL,
                            header::HeaderValue::from_static("no-store"),
                        );
                        response
                    }
                    Err(refused) => {
                        tracing::debug!(%peer, "watch refused: {refused}");
                        let body = format!("{refused}; retry later\n");
                        respond(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            Either::Left(Full::new(Bytes::from(body))),
                        )
                    }
                }
            } else {
                let body = serde_json::json!({ "notices": stream.active() }).to_string();
                json(StatusCode::OK, body)
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Either::Left(Full::new(Bytes::from(metrics.render()))),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if stream.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no metadata poll answered yet\n",
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let body = Either::Left(Full::new(Bytes::from_static(body.as_bytes())));
    respond(status, "text/plain", body)
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    respond(
        status,
        "application/json",
        Either::Left(Full::new(Bytes::from(body))),
    )
}

/// A watch response body: the subscriber's queue, line by line, until the stream drops it.
pub struct WatchBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|bytes| Ok(Frame::data(bytes))))
    }
}
