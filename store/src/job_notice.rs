//! The job-wide notice: one well-known key, `<prefix>/<job>/notice.json`, through which a notice
//! that reached one node reaches every pod of a multi-pod job (on Kubernetes and bare EC2 alike,
//! with no service of its own).
//!
//! The sidecar that takes an emergency notice publishes it here; every sidecar of the job polls
//! the key with a conditional GET (`If-None-Match` on the last ETag seen): an unchanged notice
//! costs a `304`, a missing one a `404`, and only a new one is read. A poll is the cheapest
//! request S3 has (a GET), so a pod polling every 2 s makes 43,200 requests a day.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::manifest::crc32c_base64;
use crate::s3::{ChecksumMode, Operation, S3Error, Store};

/// Name of the notice object under `<prefix>/<job>/`.
pub const NOTICE_OBJECT: &str = "notice.json";
/// A notice bigger than this is not one of ours.
const MAX_NOTICE_BYTES: usize = 64 * 1024;
/// A poll gets one attempt and this long to answer: the poller keeps its own schedule and
/// backoff, and the SDK's retries (a minute of them against a failing store) would hold one
/// poll past many of its successors.
const POLL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A notice as published for the job: who took it and until when the job has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobNotice {
    /// The notice's id (`spot-interruption/<time>`, ...): each pod acts on an id once.
    pub id: String,
    pub kind: String,
    /// The rank whose node received it.
    pub rank: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When that node goes away (RFC 3339): the job's checkpoint aims to commit before it.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// When it was first seen (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    /// The notice as the agent sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<serde_json::Value>,
}

/// What a poll found.
#[derive(Debug, Clone, PartialEq)]
pub enum Polled {
    /// No notice was ever published for the job.
    Absent,
    /// The same notice as the last poll (`304 Not Modified`).
    Unchanged,
    /// A notice, new to this poller.
    Notice {
        notice: Box<JobNotice>,
        /// Its ETag, for the next conditional poll.
        etag: String,
        /// When the store wrote it (its clock, comparable with the manifests' times).
        written: OffsetDateTime,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    #[error("reading the job-wide notice")]
    Fetch(#[source] S3Error),
    #[error("reading the body of the job-wide notice s3://{bucket}/{key}")]
    Body {
        bucket: String,
        key: String,
        #[source]
        source: aws_sdk_s3::primitives::ByteStreamError,
    },
    #[error("the job-wide notice s3://{bucket}/{key} is not a Nerve notice")]
    Parse {
        bucket: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("publishing the job-wide notice")]
    Publish(#[source] S3Error),
}

/// Publishes `notice` for every pod of the job (one PUT, retried by the SDK).
pub async fn publish_notice(store: &Store, notice: &JobNotice) -> Result<(), NoticeError> {
    let key = store.notice_key();
    let body = serde_json::to_vec_pretty(notice).unwrap_or_default();
    let mut request = store
        .client()
        .put_object()
        .bucket(store.bucket())
        .key(&key)
        .content_type("application/json")
        .body(aws_sdk_s3::primitives::ByteStream::from(body.clone()));
    if store.checksum_mode() == ChecksumMode::Crc32c {
        request = request.checksum_crc32_c(crc32c_base64(crate::checksum::crc32c(&body)));
    }
    request
        .send()
        .await
        .map(|_| ())
        .map_err(|e| NoticeError::Publish(store.error(Operation::PutObject, &key, e)))
}

/// Reads the job-wide notice unless its ETag is still `seen`.
pub async fn poll_notice(store: &Store, seen: Option<&str>) -> Result<Polled, NoticeError> {
    let key = store.notice_key();
    let response = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(&key)
        .set_if_none_match(seen.map(str::to_owned))
        .customize()
        .config_override(
            aws_sdk_s3::config::Builder::default()
                .retry_config(aws_smithy_types::retry::RetryConfig::standard().with_max_attempts(1))
                .timeout_config(
                    aws_smithy_types::timeout::TimeoutConfig::builder()
                        .operation_timeout(POLL_TIMEOUT)
                        .build(),
                ),
        )
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(e) => {
            let err = store.error(Operation::GetObject, &key, e);
            return match err.status {
                Some(304) => Ok(Polled::Unchanged),
                _ if err.is_not_found() => Ok(Polled::Absent),
                _ => Err(NoticeError::Fetch(err)),
            };
        }
    };
    let etag = response.e_tag().unwrap_or_default().to_owned();
    let written = response
        .last_modified()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.secs()).ok())
        .unwrap_or_else(OffsetDateTime::now_utc);
    let body = response
        .body
        .collect()
        .await
        .map_err(|source| NoticeError::Body {
            bucket: store.bucket().to_owned(),
            key: key.clone(),
            source,
        })?
        .into_bytes();
    let parse_error = |source| NoticeError::Parse {
        bucket: store.bucket().to_owned(),
        key: key.clone(),
        source,
    };
    if body.len() > MAX_NOTICE_BYTES {
        return Err(parse_error(serde::de::Error::custom("larger than 64 KiB")));
    }
    let notice = serde_json::from_slice(&body).map_err(parse_error)?;
    Ok(Polled::Notice {
        notice: Box::new(notice),
        etag,
        written,
    })
}

/// When the newest complete generation was committed (its manifest written, by the store's
/// clock), if any: a job-wide notice written before it was answered already.
pub async fn newest_commit_time(store: &Store) -> Result<Option<OffsetDateTime>, S3Error> {
    let listing = crate::list::list_generation_level(store).await?;
    let newest = listing.committed.iter().map(|(_, written)| *written).max();
    Ok(newest.and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok()))
}
