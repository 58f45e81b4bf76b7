//! Plain-HTTP requests to the metadata service, each bounded by a timeout and a body size.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::PollError;

/// Metadata answers are a few hundred bytes; anything near this is not a metadata answer.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The agent polls every second: keep the connections alive between polls, but not forever
/// (the metadata service drops idle connections after a while anyway).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection per concurrent endpoint of a poll (AWS reads four at once).
const POOL_MAX_IDLE: usize = 4;

/// An answer from the metadata service: status and (bounded) body.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("")
    }
}

#[derive(Clone)]
pub(crate) struct Transport {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
    timeout: Duration,
}

impl Transport {
    pub fn new(base: &str, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(connector);
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    /// Sends one request and reads its whole body, all within the request timeout.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Answer, PollError> {
        let what = format!("{method} {path}");
        let uri: Uri =
            format!("{}{path}", self.base)
                .parse()
                .map_err(|_| PollError::Unparseable {
                    what: what.clone(),
                    detail: "the request URL is invalid".to_owned(),
                })?;
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Empty::new())
            .map_err(|_| PollError::Unparseable {
                what: what.clone(),
                detail: "a request header is invalid".to_owned(),
            })?;
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|source| PollError::Connection {
                        what: what.clone(),
                        source: Box::new(source),
                    })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|source| {
                    if source.is::<http_body_util::LengthLimitError>() {
                        PollError::Unparseable {
                            what: what.clone(),
                            detail: format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                        }
                    } else {
                        PollError::Connection {
                            what: what.clone(),
                            source,
                        }
                    }
                })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(PollError::Timeout {
                what,
                timeout: self.timeout,
            }),
        }
    }
}
