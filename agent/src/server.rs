//! HTTP on `--listen`: the notice stream, metrics and health.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
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
use crate::stream::{MAX_SUBSCRIBERS, NoticeStream};

/// Open connections at most: every subscriber holds one, plus room for scrapes and probes.
const MAX_CONNECTIONS: usize = MAX_SUBSCRIBERS + 64;

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
        let stream = stream.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = service_fn(move |request| {
                let response = route(&request, &stream, &metrics);
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
            drop(permit);
        });
    }
    tracker.close();
    // Watch bodies end when the stream is closed; other requests are short.
    tracker.wait().await;
}

fn route(request: &Request<Incoming>, stream: &NoticeStream, metrics: &Metrics) -> Response<Body> {
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
                match stream.subscribe() {
                    Some(rx) => {
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
                    None => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many subscribers or shutting down; retry later\n",
                    ),
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
