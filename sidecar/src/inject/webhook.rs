//! `nerve-sidecar webhook`: the mutating admission webhook, an HTTPS server that answers
//! `AdmissionReview` v1 requests on `POST /mutate` with the sidecar injected as a JSON Patch.
//!
//! It never blocks a pod: every review it can read is answered `allowed: true`, with warnings
//! when the pod was left unchanged. The chart registers it with `failurePolicy: Ignore`, so
//! even a webhook that is down only means pods start without the sidecar.

mod admission;
mod certificate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use admission::{AdmissionError, review_admission};
pub use certificate::{CertificateError, CertificateFiles};

use super::InjectSettings;

/// Path the MutatingWebhookConfiguration calls.
pub const MUTATE_PATH: &str = "/mutate";
/// Path of the liveness and readiness probes.
pub const HEALTH_PATH: &str = "/healthz";

/// Connections served at once. The API server keeps a handful open per replica; more than this
/// is a flood, and excess connections are closed instead of queued.
const MAX_CONNECTIONS: usize = 256;
/// Largest request body: the API server refuses objects over 3 MiB, and the review carries the
/// object (and for updates the old one) plus a little envelope.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Time for a client to finish the TLS handshake; the API server's own webhook timeout (the
/// chart sets 5 s) is shorter, so a slower client is not the API server.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a client to send the request headers once connected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a client to send the whole body once the headers are in. The API server writes a
/// review (a few MiB at most) in one go, which takes milliseconds on any cluster network; a body
/// still trickling in after 10 s is not the API server, and must not hold a connection slot.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for connections in flight to finish after shutdown starts (Kubernetes sends SIGTERM
/// and waits 30 s by default before SIGKILL).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `nerve-sidecar webhook`: serve sidecar injection to the API server.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on (POST /mutate for reviews, GET /healthz for probes).
    #[arg(long, env = "NERVE_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,

    /// PEM certificate chain to serve (re-read when it changes, e.g. renewed by cert-manager).
    #[arg(long, env = "NERVE_TLS_CERT", default_value = "/etc/nerve/tls/tls.crt")]
    pub tls_cert: PathBuf,

    /// PEM private key of the certificate.
    #[arg(long, env = "NERVE_TLS_KEY", default_value = "/etc/nerve/tls/tls.key")]
    pub tls_key: PathBuf,

    #[command(flatten)]
    pub settings: InjectSettings,
}

/// Serves the webhook until `shutdown` is cancelled, then lets reviews in flight finish
/// (bounded by a grace period).
pub async fn serve_webhook(args: WebhookArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let certificate = CertificateFiles::load(&args.tls_cert, &args.tls_key).map_err(|e| {
        crate::ConfigError(format!("--tls-cert/--tls-key: {:#}", anyhow::Error::new(e)))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certificate));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let listener = TcpListener::bind(args.listen).await.map_err(|e| {
        crate::ConfigError(format!("--listen {}: cannot listen ({e})", args.listen))
    })?;
    let address = listener
        .local_addr()
        .context("reading the listening address")?;
    tracing::info!(%address, image = %args.settings.image, "webhook listening");

    let settings = Arc::new(args.settings);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "too many connections; closing one");
            continue;
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("webhook_connection", %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                serve_connection(stream, acceptor, settings, shutdown).await;
            }
            .instrument(span),
        );
    }

    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open at shutdown; closing them");
    }
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    settings: Arc<InjectSettings>,
    shutdown: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request| {
        let settings = settings.clone();
        async move { Ok::<_, std::convert::Infallible>(route(request, &settings).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn route(request: Request<Incoming>, settings: &InjectSettings) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, HEALTH_PATH) => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::POST, MUTATE_PATH) => mutate(request, settings).await,
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

#[tracing::instrument(skip_all)]
async fn mutate(request: Request<Incoming>, settings: &InjectSettings) -> Response<Full<Bytes>> {
    let too_large = || {
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            format!("a review is at most {MAX_BODY_BYTES} bytes\n"),
        )
    };
    // Refuse a body announced too large before reading any of it.
    let announced = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        tracing::warn!(length = announced, "review body too large; refused unread");
        return too_large();
    }
    let read = Limited::new(request.into_body(), MAX_BODY_BYTES).collect();
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            tracing::warn!("review body too large; refused");
            return too_large();
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading the review failed");
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("reading the review: {e}\n"),
            );
        }
        Err(_) => {
            tracing::warn!(timeout = ?BODY_READ_TIMEOUT, "review body not received in time");
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                "text/plain",
                format!(
                    "the review body did not arrive within {}s\n",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            );
        }
    };
    match review_admission(&body, settings) {
        Ok(answer) => match serde_json::to_vec(&answer) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("encoding the answer: {e}\n"),
            ),
        },
        Err(e) => {
            tracing::warn!(error = %e, "unreadable review; the API server will admit the pod unchanged");
            reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
