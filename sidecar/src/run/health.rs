//! `/healthz`, `/readyz` and `/metrics` on `--listen`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::listen::ListenStatus;

/// A scrape or probe connection idle this long is closed: probes are one request each.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the endpoints report.
pub struct HealthState {
    pub metrics: PrometheusHandle,
    pub listen: Arc<ListenStatus>,
    /// Set once the run loop is up and listening for notices.
    pub ready: AtomicBool,
}

/// Serves the endpoints on `listener` until `cancel`.
pub async fn serve_health(
    listener: TcpListener,
    state: Arc<HealthState>,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a health connection");
                    continue;
                }
            },
        };
        let state = state.clone();
        tracker.spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&request, &state)) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
    tracker.close();
}

fn answer(request: &Request<hyper::body::Incoming>, state: &HealthState) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".to_string()),
        "/readyz" => {
            if state.ready.load(Ordering::Relaxed) {
                let agent = state.listen.agent_connected.load(Ordering::Relaxed);
                let source = if agent {
                    "agent stream"
                } else {
                    "metadata fallback"
                };
                text(
                    StatusCode::OK,
                    format!("ready; notices from the {source}\n"),
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string())
            }
        }
        "/metrics" => text(StatusCode::OK, state.metrics.render()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz or /metrics\n".to_string(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds `--listen`; a failure is a configuration error.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, crate::ConfigError> {
    TcpListener::bind(address)
        .await
        .map_err(|e| crate::ConfigError(format!("--listen {address}: cannot listen ({e})")))
}
