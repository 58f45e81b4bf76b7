//! The instance metadata client: polls AWS, GCP or Azure and reports the notices active now.

mod aws;
mod azure;
mod gcp;
mod transport;

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::notice::{Cloud, Notice, NoticeKind};
use transport::Transport;

/// A failed poll keeps being logged, but at most this often while the cause stays the same:
/// a metadata service that is down for an hour must not write 3600 lines.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(300);

/// Why a poll (or part of it) failed. [`PollError::outcome`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{what} timed out after {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("{what} answered HTTP {status}")]
    Status { what: String, status: u16 },
    #[error("{what} failed on the connection")]
    Connection {
        what: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("{what} answered something unparseable: {detail}")]
    Unparseable { what: String, detail: String },
}

impl PollError {
    /// The `outcome` label this failure counts as: `timeout`, `http_5xx`, `http_4xx`,
    /// `connection` or `unparseable`.
    pub fn outcome(&self) -> &'static str {
        match self {
            PollError::Timeout { .. } => "timeout",
            PollError::Status { status, .. } if *status >= 500 => "http_5xx",
            PollError::Status { .. } => "http_4xx",
            PollError::Connection { .. } => "connection",
            PollError::Unparseable { .. } => "unparseable",
        }
    }

    /// Every poll failure is worth retrying on the next poll: the metadata service is local and
    /// its faults are transient.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// The metadata URL given is not one the client can use.
#[derive(Debug, thiserror::Error)]
#[error("{url:?} is not a plain http://HOST[:PORT] URL (metadata services speak plain HTTP)")]
pub struct InvalidMetadataUrl {
    pub url: String,
}

/// What one poll learned.
#[derive(Debug)]
pub struct PollReport {
    /// The notices active now, as well as this poll could tell: fresh for every endpoint that
    /// answered, carried over from the previous poll for the ones that failed (a failing
    /// endpoint never makes a notice disappear).
    pub notices: Vec<Notice>,
    /// The first failure of this poll, if any part of it failed.
    pub error: Option<PollError>,
    /// At least one endpoint gave a valid answer.
    pub answered: bool,
}

impl PollReport {
    /// The `outcome` label of this poll: `ok` or the failure's [`PollError::outcome`].
    pub fn outcome(&self) -> &'static str {
        self.error.as_ref().map_or("ok", PollError::outcome)
    }
}

/// What an endpoint said, before detection times and ids are attached.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    pub kind: NoticeKind,
    /// Identifies the same observation across polls (the cloud's event id or timestamp).
    pub key: String,
    pub action: String,
    pub deadline: Deadline,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Deadline {
    At(OffsetDateTime),
    /// The cloud gives no time: the deadline is this long after we first saw the notice.
    AfterDetection(Duration),
}

/// The result of reading one endpoint: its kinds, and what it said about them.
pub(crate) struct EndpointResult {
    pub kinds: &'static [NoticeKind],
    pub result: Result<Vec<Observation>, PollError>,
}

/// Polls one cloud's metadata service.
pub struct MetadataClient {
    cloud: Cloud,
    transport: Transport,
    aws: aws::Imds,
    azure: azure::ScheduledEvents,
    /// The last reported notices with their observation keys (for stable ids and detection times).
    active: Vec<(String, Notice)>,
    failures: FailureLog,
}

impl MetadataClient {
    /// A client for `base_url` (plain `http://`, as every cloud's metadata service is), with
    /// every request bounded by `request_timeout`.
    pub fn new(
        base_url: &str,
        cloud: Cloud,
        request_timeout: Duration,
    ) -> Result<Self, InvalidMetadataUrl> {
        let invalid = || InvalidMetadataUrl {
            url: base_url.to_owned(),
        };
        let uri: http::Uri = base_url.parse().map_err(|_| invalid())?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(invalid());
        }
        Ok(Self {
            cloud,
            transport: Transport::new(base_url, request_timeout),
            aws: aws::Imds::default(),
            azure: azure::ScheduledEvents::default(),
            active: Vec::new(),
            failures: FailureLog::default(),
        })
    }

    pub fn cloud(&self) -> Cloud {
        self.cloud
    }

    /// Reads the metadata service once and returns the notices active now.
    ///
    /// The same notice seen on consecutive polls has the same id and `detected_at`.
    pub async fn poll(&mut self) -> PollReport {
        let now = OffsetDateTime::now_utc();
        let endpoints = match self.cloud {
            Cloud::Aws => self.aws.poll(&self.transport).await,
            Cloud::Gcp => vec![gcp::poll(&self.transport).await],
            Cloud::Azure => vec![self.azure.poll(&self.transport).await],
        };
        let report = self.resolve(endpoints, now);
        self.failures.record(report.error.as_ref());
        report
    }

    /// Turns endpoint observations into notices, keeping ids and detection times stable and
    /// carrying over what failed endpoints said last time.
    fn resolve(&mut self, endpoints: Vec<EndpointResult>, now: OffsetDateTime) -> PollReport {
        let mut next: Vec<(String, Notice)> = Vec::new();
        let mut error = None;
        let mut answered = false;
        for endpoint in endpoints {
            match endpoint.result {
                Ok(observations) => {
                    answered = true;
                    for observation in observations {
                        let notice = self.notice_for(&observation, now);
                        if !next.iter().any(|(_, n)| n.id == notice.id) {
                            next.push((observation.key, notice));
                        }
                    }
                }
                Err(err) => {
                    for (key, notice) in &self.active {
                        if endpoint.kinds.contains(&notice.kind)
                            && !next.iter().any(|(_, n)| n.id == notice.id)
                        {
                            next.push((key.clone(), notice.clone()));
                        }
                    }
                    error.get_or_insert(err);
                }
            }
        }
        self.active = next;
        PollReport {
            notices: self.active.iter().map(|(_, n)| n.clone()).collect(),
            error,
            answered,
        }
    }

    fn notice_for(&self, observation: &Observation, now: OffsetDateTime) -> Notice {
        let seen_before = self
            .active
            .iter()
            .find(|(key, n)| n.kind == observation.kind && *key == observation.key)
            .map(|(_, n)| n);
        let detected_at = seen_before.map_or(now, |n| n.detected_at);
        let deadline = match observation.deadline {
            Deadline::At(t) => t,
            Deadline::AfterDetection(d) => detected_at + d,
        };
        Notice::new(
            observation.kind,
            observation.action.clone(),
            deadline,
            detected_at,
            self.cloud,
        )
    }
}

/// Logs poll failures without flooding: the first failure of a streak, a change of cause, a
/// reminder every [`FAILURE_LOG_INTERVAL`], and the recovery.
#[derive(Default)]
struct FailureLog {
    streak: Option<Streak>,
}

struct Streak {
    outcome: &'static str,
    failed_polls: u64,
    last_logged: Instant,
}

impl FailureLog {
    fn record(&mut self, error: Option<&PollError>) {
        match (error, &mut self.streak) {
            (None, None) => {}
            (None, Some(streak)) => {
                tracing::info!(
                    failed_polls = streak.failed_polls,
                    "metadata service answering again"
                );
                self.streak = None;
            }
            (Some(err), Some(streak)) if streak.outcome == err.outcome() => {
                streak.failed_polls += 1;
                if streak.last_logged.elapsed() >= FAILURE_LOG_INTERVAL {
                    tracing::warn!(
                        error = %error_chain(err),
                        failed_polls = streak.failed_polls,
                        "metadata poll still failing"
                    );
                    streak.last_logged = Instant::now();
                }
            }
            (Some(err), _) => {
                tracing::warn!(
                    error = %error_chain(err),
                    outcome = err.outcome(),
                    "metadata poll failed; further failures of this kind are summarised every {}s",
                    FAILURE_LOG_INTERVAL.as_secs()
                );
                self.streak = Some(Streak {
                    outcome: err.outcome(),
                    failed_polls: 1,
                    last_logged: Instant::now(),
                });
            }
        }
    }
}

/// The error and its sources on one line, `outer: inner: innermost`: how the agent and the
/// sidecar log errors they ride out (a retried API call, a failed poll).
pub fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Parses the time formats metadata services use: RFC 3339, AWS maintenance's
/// `21 Jan 2019 09:00:43 GMT` and Azure's `Mon, 19 Sep 2016 18:29:47 GMT`.
pub(crate) fn parse_time(s: &str) -> Option<OffsetDateTime> {
    use time::PrimitiveDateTime;
    use time::macros::format_description;
    let s = s.trim();
    if let Ok(t) = crate::notice::rfc3339::parse(s) {
        return Some(t);
    }
    let s = s.split_once(", ").map_or(s, |(_, rest)| rest);
    let s = s.strip_suffix(" GMT").or_else(|| s.strip_suffix(" UTC"))?;
    PrimitiveDateTime::parse(
        s,
        format_description!(
            "[day padding:none] [month repr:short] [year] [hour]:[minute]:[second]"
        ),
    )
    .ok()
    .map(PrimitiveDateTime::assume_utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn parses_the_time_formats_of_every_cloud() {
        assert_eq!(
            parse_time("21 Jan 2019 09:00:43 GMT"),
            Some(datetime!(2019-01-21 09:00:43 UTC))
        );
        assert_eq!(
            parse_time("1 Feb 2019 09:00:43 GMT"),
            Some(datetime!(2019-02-01 09:00:43 UTC))
        );
        assert_eq!(
            parse_time("Mon, 19 Sep 2016 18:29:47 GMT"),
            Some(datetime!(2016-09-19 18:29:47 UTC))
        );
        assert_eq!(
            parse_time("2017-09-18T08:22:00Z"),
            Some(datetime!(2017-09-18 08:22:00 UTC))
        );
        assert_eq!(parse_time("soon"), None);
    }

    #[test]
    fn refuses_urls_that_are_not_plain_http() {
        let err = MetadataClient::new(
            "https://169.254.169.254",
            Cloud::Aws,
            Duration::from_secs(1),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("plain"), "{err}");
        assert!(
            MetadataClient::new("169.254.169.254", Cloud::Aws, Duration::from_secs(1)).is_err()
        );
        assert!(
            MetadataClient::new("http://127.0.0.1:80", Cloud::Gcp, Duration::from_secs(1)).is_ok()
        );
    }

    #[test]
    fn labels_outcomes_by_cause() {
        let status = |status| PollError::Status {
            what: "GET /".into(),
            status,
        };
        assert_eq!(status(500).outcome(), "http_5xx");
        assert_eq!(status(503).outcome(), "http_5xx");
        assert_eq!(status(403).outcome(), "http_4xx");
        let timeout = PollError::Timeout {
            what: "GET /".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(timeout.outcome(), "timeout");
        let garbage = PollError::Unparseable {
            what: "GET /".into(),
            detail: "x".into(),
        };
        assert_eq!(garbage.outcome(), "unparseable");
    }
}
