//! The object store a job's checkpoints live in: one S3 client (built once, reused by every
//! transfer), the bucket/prefix/job addressing of DESIGN.md "Checkpoints in S3", and typed S3
//! errors that name the bucket, key and operation and say what to check.
//!
//! Endpoint, region and credentials come from the standard AWS SDK chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, IRSA, EKS Pod Identity, instance profile). TLS is rustls with ring.

use std::fmt;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::generation::Generation;

/// Attempts per request (first try plus retries) inside the SDK before an error reaches us.
///
/// Throttling (503 SlowDown) and resets come in bursts; 8 attempts with the SDK's jittered
/// exponential backoff (capped at 20 s) ride out about a minute of trouble, well inside a
/// two-minute notice.
pub const REQUEST_ATTEMPTS: u32 = 8;
/// First retry delay; the SDK doubles it with full jitter on each attempt.
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Cap on one retry delay, so a burst of throttling does not eat the notice window.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A TCP connect that takes longer than this is to a dead endpoint; fail and retry elsewhere.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No answer this long after a request started (its body included) means a stalled store or a
/// lost answer: give up on the attempt and retry it. Without it a request whose small body the
/// socket swallowed waits forever (found by tests/tests/faults.rs). 30 s carries a 30 MiB
/// body at [`MIN_BODY_THROUGHPUT`] (bigger parts get whole multiples: 60 s for the default
/// 32 MiB) and leaves room for a retry in a two-minute notice.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Slowest a request body is expected to move (bytes per second per stream); bodies too big to
/// move within [`READ_TIMEOUT`] at this rate get a longer timeout ([`Store::body_timeouts`]).
const MIN_BODY_THROUGHPUT: u64 = 1024 * 1024;

/// Whole-request retries on top of the SDK's own (which cannot retry a body that broke after
/// the response started, or a BadDigest): three rounds of [`REQUEST_ATTEMPTS`] each.
pub const TRANSFER_ATTEMPTS: u32 = 3;
/// First delay between our own retry rounds; doubled each round with full jitter.
const TRANSFER_BACKOFF: Duration = Duration::from_millis(500);

/// Where a job's checkpoints live and how to talk to the store holding them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub dest: Destination,
    /// Stable name of the training job across pods ([`check_job_name`]).
    pub job: String,
    /// Address the bucket in the path (http://host/bucket/key) instead of the host name.
    pub path_style: bool,
    pub checksum: ChecksumMode,
}

/// What the store is asked to verify on every upload request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    /// Send x-amz-checksum-crc32c (computed by us, not as an aws-chunked trailer).
    Crc32c,
    /// Send no checksum header; the manifest's checksums are still verified on restore.
    None,
}

impl ChecksumMode {
    /// The names the command line and the environment use.
    pub const NAMES: [&'static str; 2] = ["crc32c", "none"];
}

impl std::str::FromStr for ChecksumMode {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "crc32c" => Ok(ChecksumMode::Crc32c),
            "none" => Ok(ChecksumMode::None),
            _ => Err(format!(
                "`{value}` is not a checksum mode; use crc32c or none"
            )),
        }
    }
}

/// Checks a job name: it becomes one path segment of every key.
pub fn check_job_name(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value != "."
        && value != "..";
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "`{value}` is not a job name: use 1-128 letters, digits, `-`, `_` or `.`"
        ))
    }
}

/// `s3://bucket/prefix` as given by `--dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub bucket: String,
    /// Without leading or trailing slashes; may be empty.
    pub prefix: String,
}

impl Destination {
    /// Parses `s3://bucket` or `s3://bucket/some/prefix`.
    pub fn parse(value: &str) -> Result<Destination, String> {
        let rest = value.strip_prefix("s3://").ok_or_else(|| {
            format!("`{value}` is not an S3 URL; write s3://bucket or s3://bucket/prefix")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!(
                "`{bucket}` is not a bucket name: 3-63 lowercase letters, digits, `-` or `.`"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == ".." || part == ".") {
            return Err(format!(
                "prefix `{prefix}` must not contain `.` or `..` segments"
            ));
        }
        Ok(Destination {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A job's checkpoint store: the S3 client plus where the job's generations live.
///
/// Cheap to clone (the client is reference counted); build one per process and share it.
#[derive(Debug, Clone)]
pub struct Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// `<prefix>/<job>/gen/`, always ending in `/`.
    generations_prefix: String,
    job: String,
    checksum: ChecksumMode,
}

impl Store {
    /// Builds the S3 client from the SDK's environment chain and the flags.
    pub async fn connect(config: &StoreConfig) -> Store {
        Store::from_sdk_config(&Store::config_loader().load().await, config)
    }

    /// The SDK configuration loader with the sidecar's transport settings (rustls+ring HTTP
    /// client, header checksums instead of aws-chunked trailers, retries, timeouts). Callers may
    /// add an endpoint, region or credentials before `load()`.
    pub fn config_loader() -> aws_config::ConfigLoader {
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        // AWS_MAX_ATTEMPTS is the SDK's standard knob; honour it when an operator sets it.
        let attempts = std::env::var("AWS_MAX_ATTEMPTS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&n| n >= 1)
            .unwrap_or(REQUEST_ATTEMPTS);
        aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            // The SDK's default sends aws-chunked bodies with trailing checksums, which several
            // S3-compatible stores reject; we compute CRC32C ourselves and send it as a header.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            // Restore verifies every file against the manifest's CRC32C itself.
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(attempts)
                    .with_initial_backoff(RETRY_INITIAL_BACKOFF)
                    .with_max_backoff(RETRY_MAX_BACKOFF),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .build(),
            )
    }

    /// A store from a loaded SDK configuration plus the flags (`--path-style`, `--dest`, ...).
    pub fn from_sdk_config(shared: &aws_config::SdkConfig, config: &StoreConfig) -> Store {
        let s3_config = aws_sdk_s3::config::Builder::from(shared)
            .force_path_style(config.path_style)
            // The default retry quota runs dry when many parts fail at once (exactly when a
            // store is throttling a big upload); attempts stay bounded by REQUEST_ATTEMPTS.
            .retry_partition(
                RetryPartition::custom("nerve-sidecar")
                    .token_bucket(TokenBucket::unlimited())
                    .build(),
            )
            .build();
        Store::with_client(aws_sdk_s3::Client::from_conf(s3_config), config)
    }

    /// A store over an already configured client (tests, or a caller with its own config).
    pub fn with_client(client: aws_sdk_s3::Client, config: &StoreConfig) -> Store {
        let mut generations_prefix = String::new();
        if !config.dest.prefix.is_empty() {
            generations_prefix.push_str(&config.dest.prefix);
            generations_prefix.push('/');
        }
        generations_prefix.push_str(&config.job);
        generations_prefix.push_str("/gen/");
        Store {
            client,
            bucket: config.dest.bucket.clone(),
            generations_prefix,
            job: config.job.clone(),
            checksum: config.checksum,
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The job's name, one segment of every key.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// Per-request settings for a request carrying `body_len` bytes: the answer timeout grows
    /// (in whole multiples of [`READ_TIMEOUT`], so parts share a few connection pools) for
    /// bodies that need longer than [`READ_TIMEOUT`] at [`MIN_BODY_THROUGHPUT`].
    pub fn body_timeouts(body_len: u64) -> aws_sdk_s3::config::Builder {
        let needed = body_len.div_ceil(MIN_BODY_THROUGHPUT);
        let rounds = needed.div_ceil(READ_TIMEOUT.as_secs()).max(1);
        let timeout = READ_TIMEOUT.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX));
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(timeout)
                .build(),
        )
    }

    pub fn checksum_mode(&self) -> ChecksumMode {
        self.checksum
    }

    /// `<prefix>/<job>/gen/`: every key of the job starts with this.
    pub fn generations_prefix(&self) -> &str {
        &self.generations_prefix
    }

    /// `<prefix>/<job>/notice.json`: the job-wide notice ([`crate::job_notice`]).
    pub fn notice_key(&self) -> String {
        let job_prefix = self
            .generations_prefix
            .strip_suffix("gen/")
            .unwrap_or(&self.generations_prefix);
        format!("{job_prefix}{}", crate::job_notice::NOTICE_OBJECT)
    }

    /// `<prefix>/<job>/gen/<generation>/`: the objects uploaded by one generation.
    pub fn objects_prefix(&self, generation: &Generation) -> String {
        format!("{}{}/", self.generations_prefix, generation)
    }

    /// Key of a file's contents uploaded in `generation`.
    pub fn object_key(&self, generation: &Generation, relative_path: &str) -> String {
        format!(
            "{}{}/{}",
            self.generations_prefix, generation, relative_path
        )
    }

    /// `<prefix>/<job>/gen/<generation>/rank-<r>/`: the objects rank `r` uploaded for its part
    /// of a multi-pod generation.
    pub fn part_objects_prefix(&self, generation: &Generation, rank: u32) -> String {
        format!("{}{}/rank-{rank}/", self.generations_prefix, generation)
    }

    /// `<prefix>/<job>/gen/<generation>/rank-<r>.manifest.json`: rank `r`'s part, committed.
    pub fn part_manifest_key(&self, generation: &Generation, rank: u32) -> String {
        format!(
            "{}{}/rank-{rank}{}",
            self.generations_prefix,
            generation,
            crate::manifest::MANIFEST_SUFFIX
        )
    }

    /// `<prefix>/<job>/gen/<generation>.manifest.json`: the commit record (a single pod's
    /// manifest, or a multi-pod job's naming every part).
    pub fn manifest_key(&self, generation: &Generation) -> String {
        format!(
            "{}{}{}",
            self.generations_prefix,
            generation,
            crate::manifest::MANIFEST_SUFFIX
        )
    }

    /// The generation a key under [`Self::generations_prefix`] belongs to, if any.
    pub fn generation_of_key(&self, key: &str) -> Option<Generation> {
        let rest = key.strip_prefix(&self.generations_prefix)?;
        let end = rest.find(['/', '.']).unwrap_or(rest.len());
        Generation::parse(&rest[..end]).ok()
    }

    /// Keys and sizes of every object under `prefix`, in key order (all pages).
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let mut objects = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(Operation::ListObjectsV2, prefix, e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    let size = object
                        .size()
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0);
                    objects.push((key.to_owned(), size));
                }
            }
        }
        objects.sort();
        Ok(objects)
    }

    /// Wraps an SDK error with the operation, bucket and key.
    pub fn error<E>(
        &self,
        operation: Operation,
        key: &str,
        err: SdkError<E, HttpResponse>,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        S3Error::from_sdk(operation, &self.bucket, key, err)
    }
}

/// The S3 calls the sidecar makes, named as S3 names them (for errors and spans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    PutObject,
    CreateMultipartUpload,
    UploadPart,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListMultipartUploads,
    GetObject,
    HeadObject,
    ListObjectsV2,
    DeleteObjects,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What kind of failure an S3 call ended in, which decides what the user should check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3ErrorKind {
    /// The object or upload does not exist.
    NotFound,
    /// The bucket does not exist (or is in another region).
    NoSuchBucket,
    /// Credentials missing, wrong, or lacking permission.
    Denied,
    /// Throttled, 5xx, timeout or a broken connection: retrying may help.
    Transient,
    /// The store rejected the data's checksum.
    BadDigest,
    /// Anything else the store said no to.
    Rejected,
}

/// A failed S3 call, naming the operation, the bucket, the key and what to check.
#[derive(Debug, thiserror::Error)]
#[error("{operation} s3://{bucket}/{key} failed{status}; check {hint}", status = self.status_text(), hint = self.hint())]
pub struct S3Error {
    pub operation: Operation,
    pub bucket: String,
    pub key: String,
    pub kind: S3ErrorKind,
    /// HTTP status when the store answered.
    pub status: Option<u16>,
    /// S3 error code (`NoSuchKey`, `SlowDown`, ...) when the store sent one.
    pub code: Option<String>,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl S3Error {
    pub fn from_sdk<E>(
        operation: Operation,
        bucket: &str,
        key: &str,
        err: SdkError<E, HttpResponse>,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = match &err {
            SdkError::ServiceError(e) => Some(e.raw().status().as_u16()),
            SdkError::ResponseError(e) => Some(e.raw().status().as_u16()),
            _ => None,
        };
        let code = err.code().map(str::to_owned);
        let kind = classify(&err, status, code.as_deref());
        S3Error {
            operation,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            kind,
            status,
            code,
            source: Box::new(err),
        }
    }

    /// Retrying the whole request (or part) later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, S3ErrorKind::Transient | S3ErrorKind::BadDigest)
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == S3ErrorKind::NotFound
    }

    fn status_text(&self) -> String {
        match (&self.status, &self.code) {
            (Some(status), Some(code)) => format!(" ({status} {code})"),
            (Some(status), None) => format!(" (HTTP {status})"),
            (None, _) => String::new(),
        }
    }

    /// What the operator should look at.
    pub fn hint(&self) -> &'static str {
        match self.kind {
            S3ErrorKind::NotFound => {
                "that the generation was not pruned and that --dest and --job name the job"
            }
            S3ErrorKind::NoSuchBucket => {
                "the bucket name in --dest, AWS_REGION, and AWS_ENDPOINT_URL for non-AWS stores"
            }
            S3ErrorKind::Denied => {
                "credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE, IRSA or Pod Identity role) and that \
                 the role may read, write, list and delete under this prefix"
            }
            S3ErrorKind::Transient => {
                "the endpoint (AWS_ENDPOINT_URL), the network path to it, and the store's health"
            }
            S3ErrorKind::BadDigest => {
                "the network path (data was corrupted in flight) or try --checksum none if the \
                 store mis-handles checksum headers"
            }
            S3ErrorKind::Rejected => {
                "the endpoint, --path-style for S3-compatible stores, and --checksum none if the \
                 store rejects checksum headers"
            }
        }
    }
}

/// Runs `attempt` up to [`TRANSFER_ATTEMPTS`] times while it fails with an error `retryable`
/// accepts, sleeping a jittered, doubling delay in between. `attempt` gets the attempt number.
pub async fn with_retries<T, E, Fut>(
    what: &str,
    retryable: impl Fn(&E) -> bool,
    mut attempt: impl FnMut(u32) -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut round = 1;
    loop {
        match attempt(round).await {
            Ok(value) => return Ok(value),
            Err(err) if round < TRANSFER_ATTEMPTS && retryable(&err) => {
                let cap = TRANSFER_BACKOFF.saturating_mul(1 << round.min(8));
                let delay = cap.mul_f64(rand::random::<f64>());
                tracing::warn!(
                    attempt = round,
                    "{what} failed, retrying in {delay:?}: {err}"
                );
                ::metrics::counter!(crate::metrics::RETRIES).increment(1);
                tokio::time::sleep(delay).await;
                round += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

fn classify<E, R>(err: &SdkError<E, R>, status: Option<u16>, code: Option<&str>) -> S3ErrorKind {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            return S3ErrorKind::Transient;
        }
        SdkError::ConstructionFailure(_) => return S3ErrorKind::Denied,
        _ => {}
    }
    match code {
        Some("NoSuchKey" | "NoSuchUpload" | "NotFound") => return S3ErrorKind::NotFound,
        Some("NoSuchBucket") => return S3ErrorKind::NoSuchBucket,
        Some(
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "InvalidToken",
        ) => return S3ErrorKind::Denied,
        Some("BadDigest" | "InvalidDigest" | "XAmzContentChecksumMismatch") => {
            return S3ErrorKind::BadDigest;
        }
        Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable") => {
            return S3ErrorKind::Transient;
        }
        _ => {}
    }
    match status {
        Some(404) => S3ErrorKind::NotFound,
        Some(401 | 403) => S3ErrorKind::Denied,
        Some(301 | 307) => S3ErrorKind::NoSuchBucket,
        Some(408 | 429) => S3ErrorKind::Transient,
        Some(s) if s >= 500 => S3ErrorKind::Transient,
        Some(_) => S3ErrorKind::Rejected,
        // No answer at all (a body that broke mid-way, an I/O error): worth another try.
        None => S3ErrorKind::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_bodies_get_a_longer_answer_timeout_in_whole_steps() {
        let timeout = |len: u64| {
            Store::body_timeouts(len)
                .build()
                .timeout_config()
                .and_then(|t| t.read_timeout())
        };
        assert_eq!(timeout(0), Some(READ_TIMEOUT));
        assert_eq!(timeout(16 * 1024 * 1024), Some(READ_TIMEOUT));
        assert_eq!(timeout(64 * 1024 * 1024), Some(READ_TIMEOUT * 3));
    }

    #[test]
    fn parses_destinations_with_and_without_prefix() {
        let d = Destination::parse("s3://my-bucket/a/b/").expect("valid");
        assert_eq!(d.bucket, "my-bucket");
        assert_eq!(d.prefix, "a/b");
        assert_eq!(d.to_string(), "s3://my-bucket/a/b");
        let d = Destination::parse("s3://my-bucket").expect("valid");
        assert_eq!(d.prefix, "");
        assert!(Destination::parse("my-bucket/a").is_err());
        assert!(Destination::parse("s3://My_Bucket").is_err());
        assert!(Destination::parse("s3://bucket/a/../b").is_err());
    }
}
