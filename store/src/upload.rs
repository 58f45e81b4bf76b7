//! Uploading a checkpoint directory as a new generation, committed by its manifest.
//!
//! Every file goes to `<prefix>/<job>/gen/<generation>/<path>` unless the newest committed
//! generation already holds the same path with the same size and CRC32C, in which case the
//! manifest points at that object. Files and parts move in parallel under one bound on
//! requests in flight. The manifest is written last; any failure or cancellation aborts the
//! run's multipart uploads and writes no manifest, so readers never see a partial generation.

mod multipart;
mod scan;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use multipart::{MAX_PARTS, PartPlan, checksum_range, combine_part_crcs};
pub use scan::{FileStamp, LocalFile, RESERVED_PREFIX, scan_directory};

use crate::generation::Generation;
use crate::list::newest_generation;
use crate::manifest::{
    MANIFEST_VERSION, Manifest, ManifestFile, ManifestReadError, fetch_manifest, format_crc32c,
    parse_crc32c, put_manifest,
};
use crate::progress::{Progress, format_bytes, mib_per_second};
use crate::s3::{S3Error, Store};
use crate::{DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE};
use multipart::{OpenUploads, Transfer, checksum_parts, send_file};

/// Longest we spend aborting multipart uploads after a failure: the abort is housekeeping
/// (the bucket's lifecycle rule is the backstop), the process should exit promptly.
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Files whose unchanged-check reads run at once: checksumming is disk- and CPU-bound, more
/// readers than cores only thrash.
const CHECKSUM_READERS: usize = 2;

/// What the manifest records about where the checkpoint came from.
#[derive(Debug, Clone, Default)]
pub struct ManifestContext {
    /// The notice that triggered the checkpoint, as JSON.
    pub notice: Option<serde_json::Value>,
    pub node: Option<String>,
    pub pod: Option<String>,
    /// Training step, when known.
    pub step: Option<u64>,
}

/// How to upload; [`UploadOptions::default`] uses the command-line defaults.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Requests in flight across all files and parts (a background sync may use fewer).
    pub concurrency: usize,
    /// Preferred part size; grows for files that would need more than 10,000 parts.
    pub part_size: u64,
    pub context: ManifestContext,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            concurrency: DEFAULT_CONCURRENCY,
            part_size: DEFAULT_PART_SIZE,
            context: ManifestContext::default(),
        }
    }
}

/// A committed generation.
#[derive(Debug, Clone)]
pub struct UploadSummary {
    pub generation: Generation,
    pub files: usize,
    pub bytes_uploaded: u64,
    pub bytes_reused: u64,
    pub seconds: f64,
}

impl std::fmt::Display for UploadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "committed generation {}: {} files, {} uploaded, {} reused, {:.1} s, {:.0} MiB/s",
            self.generation,
            self.files,
            format_bytes(self.bytes_uploaded),
            format_bytes(self.bytes_reused),
            self.seconds,
            mib_per_second(self.bytes_uploaded, self.seconds),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("checkpoint directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("reading directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not valid UTF-8, which S3 keys must be; rename it")]
    NonUtf8Path(PathBuf),
    #[error(
        "{path} changed while it was being uploaded (size, time or inode differ); the \
         generation was not committed — is the trainer still writing the checkpoint?"
    )]
    FileChanged { path: String },
    #[error("{path} is {size} bytes, more than S3 holds in one object (10,000 parts of 5 GiB)")]
    TooLarge { path: String, size: u64 },
    #[error("uploading {path}")]
    Object {
        path: String,
        #[source]
        source: S3Error,
    },
    #[error("uploading part {part_number} of {key}")]
    PartFailed {
        key: String,
        part_number: i32,
        #[source]
        source: S3Error,
    },
    #[error("the store answered CreateMultipartUpload for {key} without an upload id")]
    NoUploadId { key: String },
    #[error("finding the previous generation")]
    Previous(#[source] S3Error),
    #[error("reading the previous generation's manifest")]
    PreviousManifest(#[source] ManifestReadError),
    #[error("writing the manifest (the commit)")]
    Commit(#[source] S3Error),
    #[error("upload cancelled; multipart uploads aborted, nothing committed")]
    Cancelled,
}

impl UploadError {
    /// Trying the whole request (or the whole upload) again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Object { source, .. }
            | UploadError::PartFailed { source, .. }
            | UploadError::Previous(source)
            | UploadError::Commit(source) => source.is_retryable(),
            UploadError::PreviousManifest(e) => e.is_retryable(),
            UploadError::FileChanged { .. } => true,
            _ => false,
        }
    }
}

/// Uploads every file under `dir` as a new generation of the store's job and commits it.
///
/// Cancelling `cancel` stops the transfer, aborts open multipart uploads and writes no
/// manifest.
pub async fn upload_generation(
    store: &Store,
    dir: &Path,
    options: &UploadOptions,
    cancel: &CancellationToken,
) -> Result<UploadSummary, UploadError> {
    upload_generation_with_progress(store, dir, options, cancel, &Progress::new()).await
}

/// [`upload_generation`], counting bytes and files into `progress` as they go (read it from
/// another task, e.g. to estimate whether the upload beats a deadline).
pub async fn upload_generation_with_progress(
    store: &Store,
    dir: &Path,
    options: &UploadOptions,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<UploadSummary, UploadError> {
    // Boxed: the SDK's futures nest deeply, and callers embed this one in their own.
    Box::pin(upload(store, dir, options, cancel, progress)).await
}

#[tracing::instrument(skip_all, fields(dir = %dir.display(), bucket = store.bucket(), prefix = store.generations_prefix()), err(Display))]
async fn upload(
    store: &Store,
    dir: &Path,
    options: &UploadOptions,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<UploadSummary, UploadError> {
    let started = Instant::now();
    let generation = Generation::new();
    let created_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let transfer = Transfer {
        store,
        requests: Arc::new(Semaphore::new(options.concurrency.max(1))),
        concurrency: options.concurrency.max(1),
        progress: progress.clone(),
        open_uploads: OpenUploads::default(),
    };
    let work = async {
        let owned_dir = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || scan_directory(&owned_dir))
            .await
            .map_err(|e| UploadError::ReadDir {
                path: dir.to_path_buf(),
                source: std::io::Error::other(e),
            })??;
        let previous = match newest_generation(store)
            .await
            .map_err(UploadError::Previous)?
        {
            Some(previous) => Some(
                fetch_manifest(store, &previous)
                    .await
                    .map_err(UploadError::PreviousManifest)?,
            ),
            None => None,
        };
        let previous_files: HashMap<&str, &ManifestFile> = previous
            .iter()
            .flat_map(|m| m.files.iter())
            .map(|f| (f.path.as_str(), f))
            .collect();
        // Content that moved: a trainer writes each checkpoint into a new `checkpoint-N/`, and
        // the files that did not change (frozen weights) are found by size and checksum.
        let mut previous_by_size: HashMap<u64, Vec<&ManifestFile>> = HashMap::new();
        for file in previous.iter().flat_map(|m| m.files.iter()) {
            previous_by_size.entry(file.size).or_default().push(file);
        }
        transfer
            .progress
            .add_total(files.len() as u64, files.iter().map(|f| f.stamp.size).sum());
        tracing::info!(
            %generation,
            files = files.len(),
            previous = previous.as_ref().map(|m| m.generation.as_str()),
            "uploading"
        );
        let checksum_readers = Semaphore::new(CHECKSUM_READERS);
        // Futures built up front rather than in a `.map` closure: a closure returning a
        // borrowing future makes the whole upload future not provably `Send` (rust#102211).
        let uploads: Vec<_> = files
            .iter()
            .map(|file| {
                let previous = match previous_files.get(file.path.as_str()) {
                    Some(same_path) if same_path.size == file.stamp.size => vec![*same_path],
                    _ => previous_by_size
                        .get(&file.stamp.size)
                        .cloned()
                        .unwrap_or_default(),
                };
                upload_file(
                    &transfer,
                    &generation,
                    file,
                    previous,
                    options.part_size,
                    &checksum_readers,
                )
            })
            .collect();
        let entries: Vec<(ManifestFile, bool)> = futures::stream::iter(uploads)
            .buffered(transfer.concurrency)
            .try_collect()
            .await?;
        Ok::<_, UploadError>(entries)
    };
    let result = tokio::select! {
        result = work => result,
        () = cancel.cancelled() => Err(UploadError::Cancelled),
    };
    let result = match result {
        Ok(_) if cancel.is_cancelled() => Err(UploadError::Cancelled),
        other => other,
    };
    let entries = match result {
        Ok(entries) => entries,
        Err(err) => {
            abort_open_uploads(store, &generation, &transfer.open_uploads).await;
            ::metrics::counter!(crate::metrics::UPLOADS, "outcome" => "failed").increment(1);
            return Err(err);
        }
    };

    let mut bytes_uploaded = 0;
    let mut bytes_reused = 0;
    for (entry, reused) in &entries {
        if *reused {
            bytes_reused += entry.size;
        } else {
            bytes_uploaded += entry.size;
        }
    }
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        generation: generation.to_string(),
        job: job_of(store),
        created_at,
        node: options.context.node.clone(),
        pod: options.context.pod.clone(),
        step: options.context.step,
        notice: options.context.notice.clone(),
        files: entries.into_iter().map(|(entry, _)| entry).collect(),
    };
    put_manifest(store, &generation, &manifest)
        .await
        .map_err(UploadError::Commit)?;
    let seconds = started.elapsed().as_secs_f64();
    ::metrics::counter!(crate::metrics::UPLOADS, "outcome" => "committed").increment(1);
    ::metrics::counter!(crate::metrics::TRANSFER_BYTES, "direction" => "upload")
        .increment(bytes_uploaded);
    ::metrics::counter!(crate::metrics::REUSED_BYTES).increment(bytes_reused);
    ::metrics::histogram!(crate::metrics::UPLOAD_DURATION).record(seconds);
    Ok(UploadSummary {
        generation,
        files: manifest.files.len(),
        bytes_uploaded,
        bytes_reused,
        seconds,
    })
}

/// The job name is the path segment before `gen/` in the store's prefix.
fn job_of(store: &Store) -> String {
    store
        .generations_prefix()
        .trim_end_matches("gen/")
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Uploads (or reuses) one file; returns its manifest entry and whether it was reused.
async fn upload_file(
    transfer: &Transfer<'_>,
    generation: &Generation,
    file: &LocalFile,
    previous: Vec<&ManifestFile>,
    part_size: u64,
    checksum_readers: &Semaphore,
) -> Result<(ManifestFile, bool), UploadError> {
    let plan =
        PartPlan::for_file(file.stamp.size, part_size).ok_or_else(|| UploadError::TooLarge {
            path: file.path.clone(),
            size: file.stamp.size,
        })?;
    let mut known_crcs = None;
    let mut reuse = None;
    if !previous.is_empty() {
        let _reader = checksum_readers
            .acquire()
            .await
            .map_err(|_| UploadError::Cancelled)?;
        let path = file.abs_path.clone();
        let crcs = tokio::task::spawn_blocking(move || checksum_parts(&path, &plan))
            .await
            .map_err(|e| UploadError::ReadFile {
                path: file.abs_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| UploadError::ReadFile {
                path: file.abs_path.clone(),
                source,
            })?;
        let crc = combine_part_crcs(&plan, &crcs);
        if let Some(same) = previous
            .iter()
            .find(|p| p.size == file.stamp.size && parse_crc32c(&p.crc32c) == Some(crc))
        {
            reuse = Some((same.key.clone(), crc));
        } else {
            known_crcs = Some(crcs);
        }
    }
    let (key, crc, reused) = match reuse {
        Some((key, crc)) => {
            transfer.progress.add_reused(file.stamp.size);
            (key, crc, true)
        }
        None => {
            let key = transfer.store.object_key(generation, &file.path);
            let crc = send_file(transfer, file, &key, plan, known_crcs).await?;
            (key, crc, false)
        }
    };
    // The bytes read and sent must be the bytes of one version of the file.
    let after = FileStamp::of(&file.abs_path).map_err(|source| UploadError::ReadFile {
        path: file.abs_path.clone(),
        source,
    })?;
    if after != file.stamp {
        return Err(UploadError::FileChanged {
            path: file.path.clone(),
        });
    }
    transfer.progress.file_done();
    Ok((
        ManifestFile {
            path: file.path.clone(),
            size: file.stamp.size,
            mode: file.stamp.mode,
            crc32c: format_crc32c(crc),
            key,
        },
        reused,
    ))
}

/// Aborts every multipart upload this run opened, plus any the store lists under this
/// generation's prefix (one whose CreateMultipartUpload answer was lost), within
/// [`ABORT_TIMEOUT`].
async fn abort_open_uploads(store: &Store, generation: &Generation, open: &OpenUploads) {
    let work = async {
        let mut uploads = open.take_all();
        let prefix = store.objects_prefix(generation);
        match store
            .client()
            .list_multipart_uploads()
            .bucket(store.bucket())
            .prefix(&prefix)
            .send()
            .await
        {
            Ok(listing) => {
                for upload in listing.uploads() {
                    if let (Some(key), Some(id)) = (upload.key(), upload.upload_id())
                        && !uploads.iter().any(|(_, known)| known == id)
                    {
                        uploads.push((key.to_owned(), id.to_owned()));
                    }
                }
            }
            Err(err) => tracing::debug!(
                "cannot list multipart uploads under {prefix} (some stores do not support it): {}",
                aws_sdk_s3::error::DisplayErrorContext(&err)
            ),
        }
        futures::stream::iter(uploads)
            .for_each_concurrent(8, |(key, upload_id)| async move {
                let result = store
                    .client()
                    .abort_multipart_upload()
                    .bucket(store.bucket())
                    .key(&key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                match result {
                    Ok(_) => tracing::debug!(%key, "aborted multipart upload"),
                    Err(err) => {
                        let err = store.error(crate::s3::Operation::AbortMultipartUpload, &key, err);
                        if !err.is_not_found() {
                            tracing::warn!("{err:#}; its parts stay until the bucket's lifecycle rule removes them");
                        }
                    }
                }
            })
            .await;
    };
    if tokio::time::timeout(ABORT_TIMEOUT, work).await.is_err() {
        tracing::warn!(
            "aborting multipart uploads took longer than {ABORT_TIMEOUT:?}; some parts may stay \
             until the bucket's lifecycle rule removes them"
        );
    }
}
