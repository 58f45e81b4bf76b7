//! Uploading a checkpoint directory as a new generation, committed by its manifest.
//!
//! Every file goes to `<prefix>/<job>/gen/<generation>/<path>` unless the newest committed
//! generation already holds the same content (same size, CRC32C and CRC-64/NVME), in which case
//! the manifest points at that object. Files and parts move in parallel under one bound on
//! requests in flight, and small files (up to [`crate::SMALL_FILE`], read whole and sent from
//! memory) under one of their own. The manifest is written last; any failure or cancellation aborts the
//! run's multipart uploads and writes no manifest, so readers never see a partial generation.
//!
//! The directory is live: a trainer keeps writing logs and rotates old checkpoints while the
//! upload runs. So excluded paths ([`crate::exclude`]) are never read; a file that changes while
//! it is sent is sent again (up to [`FILE_ATTEMPTS`] times, within the caller's cancellation);
//! and a file deleted meanwhile drops out of the generation together with the rest of its
//! step-named checkpoint directory (a `checkpoint-N/` missing a file is not a checkpoint), so
//! rotation of an older checkpoint never costs the newest one. An upload that commits step N
//! leaves out the step checkpoints newer than N ([`newer_step_entries`]): the trainer began
//! them after the checkpoint being committed, and a later generation takes them whole.

mod multipart;
mod scan;
mod small;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use multipart::{MAX_PARTS, PartPlan, checksum_range, combine_part_crcs};
pub use scan::{FileStamp, LocalFile, inside_link_target, scan_directory};

use crate::checksum::Checksums;
use crate::exclude::Excludes;
use crate::generation::Generation;
use crate::list::newest_generation;
use crate::manifest::{
    MANIFEST_VERSION, MANIFEST_VERSION_LINKS, Manifest, ManifestFile, ManifestReadError,
    fetch_manifest_at, fold_manifest, format_crc32c, format_crc64, key_inside, manifest_body,
    put_json,
};
use crate::part::{JobCommit, PartError, Rank, commit_job, committed_ranks, previous_part};
use crate::progress::{Progress, format_bytes, mib_per_second};
use crate::s3::{S3Error, Store};
use crate::step::{StepPattern, newer_step_entries};
use crate::{DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, SMALL_FILE, small_requests};
use multipart::{OpenUploads, Transfer, checksum_parts, send_file};
use small::send_small;

/// Longest we spend aborting multipart uploads after a failure: the abort is housekeeping
/// (the bucket's lifecycle rule is the backstop), the process should exit promptly.
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Files whose unchanged-check reads run at once: checksumming is disk- and CPU-bound, more
/// readers than cores only thrash.
const CHECKSUM_READERS: usize = 2;
/// Times one file is sent before a file that keeps changing fails the upload: a trainer that
/// rewrites a file twice within its upload is still writing it, and a third try would be as
/// torn as the first two.
pub const FILE_ATTEMPTS: u32 = 3;

/// What the manifest records about where the checkpoint came from.
#[derive(Debug, Clone, Default)]
pub struct ManifestContext {
    /// The notice that triggered the checkpoint, as JSON.
    pub notice: Option<serde_json::Value>,
    pub node: Option<String>,
    pub pod: Option<String>,
    /// Training step, when known. Step-named entries of a newer step are left out of the
    /// generation.
    pub step: Option<u64>,
}

/// How to upload; [`UploadOptions::default`] uses the command-line defaults.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Requests in flight across all parts and large files (a background sync may use fewer);
    /// small files get [`crate::small_requests`] of their own.
    pub concurrency: usize,
    /// Preferred part size; grows for files that would need more than 10,000 parts.
    pub part_size: u64,
    pub context: ManifestContext,
    /// Paths under the directory that are not checkpoint content.
    pub excludes: Excludes,
    /// Names of step checkpoints (`checkpoint-N/`): a file deleted during the upload takes its
    /// whole step checkpoint out of the generation.
    pub step_pattern: StepPattern,
    /// This pod's rank in a multi-pod job: the upload is its part of the generation named by
    /// `context.step`. `None` (or a world size of 1) uploads a single pod's generation.
    pub rank: Option<Rank>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            concurrency: DEFAULT_CONCURRENCY,
            part_size: DEFAULT_PART_SIZE,
            context: ManifestContext::default(),
            excludes: Excludes::default(),
            step_pattern: StepPattern::default(),
            rank: None,
        }
    }
}

/// A committed generation, or a committed part of one.
#[derive(Debug, Clone)]
pub struct UploadSummary {
    pub generation: Generation,
    /// The rank whose part was committed, in a multi-pod job.
    pub rank: Option<Rank>,
    /// The training step the manifest records.
    pub step: Option<u64>,
    pub files: usize,
    pub bytes_uploaded: u64,
    pub bytes_reused: u64,
    pub seconds: f64,
    /// For a part: whether the whole generation is committed now.
    pub job: Option<JobCommit>,
    /// Step-named entries newer than `step` that the generation does not hold (relative
    /// paths): a later generation has to take them.
    pub left_out: Vec<String>,
}

impl std::fmt::Display for UploadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(rank) = self.rank {
            write!(f, "committed rank {}'s part of ", rank.rank)?;
        } else {
            f.write_str("committed ")?;
        }
        write!(
            f,
            "generation {}: {} files, {} uploaded, {} reused, {:.1} s, {:.0} MiB/s",
            self.generation,
            self.files,
            format_bytes(self.bytes_uploaded),
            format_bytes(self.bytes_reused),
            self.seconds,
            mib_per_second(self.bytes_uploaded, self.seconds),
        )?;
        match self.job {
            Some(JobCommit::Written) => f.write_str("; every part is in: generation committed"),
            Some(JobCommit::AlreadyCommitted) => f.write_str("; the generation was committed"),
            Some(JobCommit::Waiting {
                committed,
                world_size,
            }) => write!(
                f,
                "; {committed} of {world_size} parts committed, the last rank commits the generation"
            ),
            None => Ok(()),
        }?;
        match self.step {
            Some(step) if !self.left_out.is_empty() => write!(
                f,
                "; left out {} (newer than step {step})",
                self.left_out.join(", ")
            ),
            _ => Ok(()),
        }
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
        "{path} changed while it was being uploaded, {FILE_ATTEMPTS} times (size, time or inode \
         differ); the generation was not committed — is the trainer still writing the \
         checkpoint? If it is a log, exclude it (--exclude)"
    )]
    FileChanged { path: String },
    #[error(
        "{dir} holds no checkpoint files (every file is excluded, or was deleted during the \
         upload); nothing was committed"
    )]
    Empty { dir: PathBuf },
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
    #[error(
        "rank {rank} of a multi-pod job cannot tell which step its checkpoint holds, so it \
         cannot name the generation every rank shares: write `step=N` into the done marker, \
         name the checkpoint directory like checkpoint-N (or set --step-from), or keep the \
         Hugging Face trainer_state.json; nothing was committed"
    )]
    NoStep { rank: u32 },
    #[error("{0}")]
    StepOutOfRange(String),
    #[error("committing the multi-pod generation (this rank's part is committed)")]
    Job(#[source] Box<PartError>),
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
            UploadError::Job(e) => e.is_retryable(),
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

/// Where an upload lands: a single pod's new generation, or one rank's part of the
/// generation named by the checkpoint's step.
#[derive(Debug, Clone)]
struct Target {
    generation: Generation,
    rank: Option<Rank>,
    /// Prefix of the objects this upload writes.
    objects_prefix: String,
    /// The manifest this upload commits.
    manifest_key: String,
}

impl Target {
    fn of(store: &Store, options: &UploadOptions) -> Result<Target, UploadError> {
        let Some(rank) = options.rank.filter(Rank::is_multi_pod) else {
            let generation = Generation::new();
            return Ok(Target {
                objects_prefix: store.objects_prefix(&generation),
                manifest_key: store.manifest_key(&generation),
                generation,
                rank: None,
            });
        };
        let step = options
            .context
            .step
            .ok_or(UploadError::NoStep { rank: rank.rank })?;
        let generation = Generation::for_step(step).map_err(UploadError::StepOutOfRange)?;
        Ok(Target {
            objects_prefix: store.part_objects_prefix(&generation, rank.rank),
            manifest_key: store.part_manifest_key(&generation, rank.rank),
            generation,
            rank: Some(rank),
        })
    }
}

/// What an upload may reuse from the previous generation: the sizes of its files (a file of
/// any other size cannot match, so it is sent without being checksummed first) and, by size and
/// both checksums, the key that holds each content. Looked up by content, not by a list of
/// same-size candidates per file: among many files of one size (zarr chunks, per-rank shards)
/// such lists made every file compare against every other.
#[derive(Debug, Default)]
struct ReuseIndex {
    /// Keys outside this prefix (the job's) are never reused.
    prefix: String,
    sizes: HashSet<u64>,
    by_content: HashMap<(u64, Checksums), String>,
}

impl ReuseIndex {
    /// An empty index for the job whose keys start with `prefix`.
    fn new(prefix: &str) -> ReuseIndex {
        ReuseIndex {
            prefix: prefix.to_owned(),
            ..ReuseIndex::default()
        }
    }

    /// The index of `previous`, whose entries it takes.
    fn of(prefix: &str, previous: Option<Manifest>) -> ReuseIndex {
        let mut index = ReuseIndex::new(prefix);
        for file in previous.into_iter().flat_map(|m| m.files) {
            index.add(file);
        }
        index
    }

    /// Adds an earlier file; links, files without both checksums and keys outside the job are
    /// never reused.
    fn add(&mut self, file: ManifestFile) {
        let Some(crc) = file.checksums() else { return };
        if file.link.is_some() || !key_inside(&file.key, &self.prefix) {
            return;
        }
        self.sizes.insert(file.size);
        self.by_content.entry((file.size, crc)).or_insert(file.key);
    }

    /// Whether a file of `size` may be reused, i.e. is worth checksumming before it is sent.
    fn has_size(&self, size: u64) -> bool {
        self.sizes.contains(&size)
    }

    /// The key of an earlier object with these bytes.
    fn key_of(&self, size: u64, crc: Checksums) -> Option<&str> {
        self.by_content.get(&(size, crc)).map(String::as_str)
    }
}

/// What the reuse check compares against, and the generation it comes from: the newest
/// generation's manifest (a single pod), read entry by entry into the index; or this rank's
/// previous part (a multi-pod job: ranks hold different files).
async fn previous_files(
    store: &Store,
    target: &Target,
) -> Result<(Option<String>, ReuseIndex), UploadError> {
    let prefix = store.generations_prefix();
    if let Some(rank) = target.rank {
        let part = previous_part(store, rank.rank, &target.generation)
            .await
            .map_err(UploadError::PreviousManifest)?;
        let generation = part.as_ref().map(|p| p.generation.clone());
        return Ok((generation, ReuseIndex::of(prefix, part)));
    }
    let Some(previous) = newest_generation(store)
        .await
        .map_err(UploadError::Previous)?
    else {
        return Ok((None, ReuseIndex::new(prefix)));
    };
    let key = store.manifest_key(&previous);
    let (_, index) = fold_manifest(
        store,
        &key,
        &previous,
        || ReuseIndex::new(prefix),
        ReuseIndex::add,
    )
    .await
    .map_err(UploadError::PreviousManifest)?;
    Ok((Some(previous.to_string()), index))
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
    let target = Target::of(store, options)?;
    if let Some(summary) = part_already_committed(store, &target, started).await? {
        return Ok(summary);
    }
    let concurrency = options.concurrency.max(1);
    let transfer = Transfer {
        store,
        requests: Arc::new(Semaphore::new(concurrency)),
        small_requests: Semaphore::new(small_requests(concurrency)),
        large_files: Semaphore::new(concurrency),
        files_in_flight: small_requests(concurrency),
        concurrency,
        progress: progress.clone(),
        open_uploads: OpenUploads::default(),
        objects_prefix: target.objects_prefix.clone(),
    };
    let result = tokio::select! {
        result = send_files(&transfer, &target, dir, options) => result,
        () = cancel.cancelled() => Err(UploadError::Cancelled),
    };
    let entries = match result {
        Ok(_) if cancel.is_cancelled() => Err(UploadError::Cancelled),
        Ok((outcomes, left_out)) => {
            let entries = without_vanished(outcomes, &options.step_pattern);
            if entries.is_empty() {
                Err(UploadError::Empty {
                    dir: dir.to_path_buf(),
                })
            } else {
                Ok((entries, left_out))
            }
        }
        Err(err) => Err(err),
    };
    let (entries, left_out) = match entries {
        Ok(entries) => entries,
        Err(err) => {
            abort_open_uploads(store, &target.objects_prefix, &transfer.open_uploads).await;
            ::metrics::counter!(crate::metrics::UPLOADS, "outcome" => "failed").increment(1);
            return Err(err);
        }
    };
    commit(store, &target, options, entries, left_out, started).await
}

/// The files an upload takes, and the step checkpoints it leaves out.
#[derive(Debug)]
struct Scanned {
    files: Vec<LocalFile>,
    /// Step-named entries newer than the step the upload commits (relative paths).
    left_out: Vec<String>,
}

/// Scans `dir` for the files an upload with `options` takes: every file the excludes allow,
/// less the step checkpoints newer than `options.context.step` ([`newer_step_entries`])
/// (blocking).
fn scan_checkpoint(dir: &Path, options: &UploadOptions) -> Result<Scanned, UploadError> {
    let files = scan_directory(dir, &options.excludes)?;
    let Some(step) = options.context.step else {
        return Ok(Scanned {
            files,
            left_out: Vec::new(),
        });
    };
    // Looked for after the scan: every step directory the scan found is seen here too.
    let newer = newer_step_entries(dir, step, &options.step_pattern, &options.excludes);
    if !newer.is_empty() {
        let names: Vec<String> = newer
            .iter()
            .map(|e| format!("{}{}", e.path, if e.is_dir { "/" } else { "" }))
            .collect();
        tracing::warn!(
            "left out {}: newer than step {step}, which this generation commits; a later \
             generation takes it",
            names.join(", ")
        );
    }
    let left_out: Vec<String> = newer.into_iter().map(|entry| entry.path).collect();
    let files = files
        .into_iter()
        .filter(|file| !left_out.iter().any(|path| is_within(&file.path, path)))
        .collect();
    Ok(Scanned { files, left_out })
}

/// `path` is `dir` or lies under it (both relative, `/`-separated).
fn is_within(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Scans `dir` and sends (or reuses) every file it takes; returns what became of each, and the
/// step checkpoints left out.
///
/// Each file's future is made when a slot frees up, not all up front: an unpolled upload
/// future is a few KiB (it holds the SDK's request futures), which at 40,000 files had been
/// most of the upload's memory. Files finish in any order; the entries are sorted by path.
async fn send_files(
    transfer: &Transfer<'_>,
    target: &Target,
    dir: &Path,
    options: &UploadOptions,
) -> Result<(Vec<FileOutcome>, Vec<String>), UploadError> {
    let (owned_dir, owned_options) = (dir.to_path_buf(), options.clone());
    let Scanned { files, left_out } =
        tokio::task::spawn_blocking(move || scan_checkpoint(&owned_dir, &owned_options))
            .await
            .map_err(|e| UploadError::ReadDir {
                path: dir.to_path_buf(),
                source: std::io::Error::other(e),
            })??;
    let (previous, reuse) = previous_files(transfer.store, target).await?;
    tracing::info!(
        generation = %target.generation,
        rank = target.rank.map(|r| r.rank),
        files = files.len(),
        previous,
        "uploading"
    );
    transfer
        .progress
        .add_total(files.len() as u64, files.iter().map(|f| f.stamp.size).sum());
    let checksum_readers = Semaphore::new(CHECKSUM_READERS);
    let (reuse, readers, part_size) = (&reuse, &checksum_readers, options.part_size);
    // Boxed with an explicit `Send`: a closure returning the bare borrowing future makes the
    // whole upload future not provably `Send` (rust#102211).
    // Sized up front: grown by doubling, the outcomes of 100,000 files held up to twice
    // their size (and three times while one growth copied them).
    let mut outcomes: Vec<FileOutcome> = Vec::with_capacity(files.len());
    let mut uploads = futures::stream::iter(files)
        .map(|file| -> BoxFuture<'_, Result<FileOutcome, UploadError>> {
            Box::pin(upload_file(transfer, file, reuse, part_size, readers))
        })
        .buffer_unordered(transfer.files_in_flight);
    while let Some(outcome) = uploads.try_next().await? {
        outcomes.push(outcome);
    }
    outcomes.sort_by(|a, b| a.path().cmp(b.path()));
    Ok((outcomes, left_out))
}

/// Writes the manifest (the commit) and, for a multi-pod part, the job manifest when this was
/// the last part.
async fn commit(
    store: &Store,
    target: &Target,
    options: &UploadOptions,
    entries: Vec<(ManifestFile, bool)>,
    left_out: Vec<String>,
    started: Instant,
) -> Result<UploadSummary, UploadError> {
    let (mut bytes_uploaded, mut bytes_reused) = (0, 0);
    for (entry, reused) in &entries {
        if *reused {
            bytes_reused += entry.size;
        } else {
            bytes_uploaded += entry.size;
        }
    }
    let has_links = entries.iter().any(|(entry, _)| entry.link.is_some());
    let manifest = Manifest {
        version: if has_links {
            MANIFEST_VERSION_LINKS
        } else {
            MANIFEST_VERSION
        },
        generation: target.generation.to_string(),
        job: store.job().to_owned(),
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        node: options.context.node.clone(),
        pod: options.context.pod.clone(),
        step: options.context.step,
        notice: options.context.notice.clone(),
        rank: target.rank.map(|r| r.rank),
        world_size: target.rank.map(|r| r.world_size),
        files: entries.into_iter().map(|(entry, _)| entry).collect(),
    };
    let (body, files) = (manifest_body(&manifest), manifest.files.len());
    // The entries are in the body now; only the body is held while it is sent.
    drop(manifest);
    put_json(
        store,
        &target.manifest_key,
        body,
        options.context.step,
        false,
    )
    .await
    .map_err(UploadError::Commit)?;
    let job = commit_job_of(store, target).await?;
    let seconds = started.elapsed().as_secs_f64();
    ::metrics::counter!(crate::metrics::UPLOADS, "outcome" => "committed").increment(1);
    ::metrics::counter!(crate::metrics::TRANSFER_BYTES, "direction" => "upload")
        .increment(bytes_uploaded);
    ::metrics::counter!(crate::metrics::REUSED_BYTES).increment(bytes_reused);
    ::metrics::histogram!(crate::metrics::UPLOAD_DURATION).record(seconds);
    Ok(UploadSummary {
        generation: target.generation.clone(),
        rank: target.rank,
        step: options.context.step,
        files,
        bytes_uploaded,
        bytes_reused,
        seconds,
        job,
        left_out,
    })
}

/// For a multi-pod part: commits the job manifest if every part is there.
async fn commit_job_of(store: &Store, target: &Target) -> Result<Option<JobCommit>, UploadError> {
    let (Some(rank), Some(step)) = (target.rank, target.generation.step()) else {
        return Ok(None);
    };
    let commit = commit_job(store, &target.generation, step, rank.world_size)
        .await
        .map_err(|e| UploadError::Job(Box::new(e)))?;
    Ok(Some(commit))
}

/// A rank whose part of this step is committed already (a background sync took the same
/// step) sends nothing again; it only makes sure the job manifest gets written.
async fn part_already_committed(
    store: &Store,
    target: &Target,
    started: Instant,
) -> Result<Option<UploadSummary>, UploadError> {
    let Some(rank) = target.rank else {
        return Ok(None);
    };
    let committed = committed_ranks(store, &target.generation)
        .await
        .map_err(UploadError::Previous)?;
    if !committed.contains(&rank.rank) {
        return Ok(None);
    }
    tracing::info!(generation = %target.generation, rank = rank.rank,
        "this rank's part of this step is committed already; nothing to send");
    let part = fetch_manifest_at(store, &target.manifest_key, &target.generation)
        .await
        .map_err(UploadError::PreviousManifest)?;
    let job = commit_job_of(store, target).await?;
    Ok(Some(UploadSummary {
        generation: target.generation.clone(),
        rank: Some(rank),
        step: part.step,
        files: part.files.len(),
        bytes_uploaded: 0,
        bytes_reused: part.total_bytes(),
        seconds: started.elapsed().as_secs_f64(),
        job,
        left_out: Vec::new(),
    }))
}

/// What became of one file of the upload.
enum FileOutcome {
    /// Its manifest entry, and whether its bytes were reused from an earlier generation.
    Stored(ManifestFile, bool),
    /// Deleted (or turned into something else) while the upload ran: not part of it.
    Vanished(String),
}

impl FileOutcome {
    fn path(&self) -> &str {
        match self {
            FileOutcome::Stored(entry, _) => &entry.path,
            FileOutcome::Vanished(path) => path,
        }
    }
}

/// The manifest entries of `outcomes`, without the files that vanished and without every file
/// of a step checkpoint (`checkpoint-N/`) one of whose files vanished.
fn without_vanished(
    outcomes: Vec<FileOutcome>,
    step_pattern: &StepPattern,
) -> Vec<(ManifestFile, bool)> {
    let gone: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            FileOutcome::Vanished(path) => Some(step_checkpoint_of(path, step_pattern)),
            FileOutcome::Stored(..) => None,
        })
        .collect();
    for dropped in &gone {
        tracing::info!(path = %dropped, "left out of the generation: deleted while it was being uploaded");
    }
    outcomes
        .into_iter()
        .filter_map(|outcome| match outcome {
            FileOutcome::Stored(entry, reused) => Some((entry, reused)),
            FileOutcome::Vanished(_) => None,
        })
        .filter(|(entry, _)| !gone.iter().any(|g| is_within(&entry.path, g)))
        .collect()
}

/// The deepest step-named directory holding `path` (`checkpoint-7` for
/// `checkpoint-7/optimizer.pt`), or the path itself outside any.
fn step_checkpoint_of(path: &str, step_pattern: &StepPattern) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    (1..segments.len())
        .rev()
        .find(|&end| step_pattern.step_in_name(segments[end - 1]).is_some())
        .map_or_else(|| path.to_owned(), |end| segments[..end].join("/"))
}

/// A checkpoint file opened for its upload and proven to be the file the scan found (same
/// device and inode), so what is read is that file even if the path is swapped for a link
/// meanwhile. Its bytes are read through `/proc/self/fd/N`, a name for this open file that
/// the SDK can reopen for every part and retry, and that keeps working after the file is
/// deleted (the deletion is noticed afterwards).
struct OpenedFile {
    _file: std::fs::File,
    read_path: PathBuf,
}

/// Why a file could not be opened as the scanned one.
enum OpenFailure {
    /// Deleted since the scan.
    Gone,
    /// Replaced by another file or a link since the scan.
    Replaced,
    Io(std::io::Error),
}

/// Opens `path` without following a link and checks it is the regular file `stamp` describes
/// (same device and inode).
fn open_checked(path: &Path, stamp: &FileStamp) -> Result<std::fs::File, OpenFailure> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path);
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OpenFailure::Gone),
        // O_NOFOLLOW on a link.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(OpenFailure::Replaced);
        }
        Err(e) => return Err(OpenFailure::Io(e)),
    };
    let meta = opened.metadata().map_err(OpenFailure::Io)?;
    if meta.dev() != stamp.device || meta.ino() != stamp.inode || !meta.is_file() {
        return Err(OpenFailure::Replaced);
    }
    Ok(opened)
}

impl OpenedFile {
    fn open(file: &LocalFile) -> Result<OpenedFile, OpenFailure> {
        use std::os::unix::io::AsRawFd;
        let opened = open_checked(&file.abs_path, &file.stamp)?;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
        // Without /proc (not Linux, or not mounted) the path itself, checked again after.
        let read_path = if by_fd.exists() {
            by_fd
        } else {
            file.abs_path.clone()
        };
        Ok(OpenedFile {
            _file: opened,
            read_path,
        })
    }
}

/// What became of one attempt at sending a file.
enum Attempt {
    /// Its manifest entry, and whether an earlier object holds its bytes.
    Sent(ManifestFile, bool),
    /// Deleted since it was found.
    Gone,
    /// Replaced, or a different size, since it was stamped: stamp it again and send that.
    Changed,
}

impl OpenFailure {
    /// The attempt at sending `path` that this failure to open it ends.
    fn ends_attempt(self, path: &Path) -> Result<Attempt, UploadError> {
        match self {
            OpenFailure::Gone => Ok(Attempt::Gone),
            OpenFailure::Replaced => Ok(Attempt::Changed),
            OpenFailure::Io(source) => Err(UploadError::ReadFile {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Uploads (or reuses) one file, or records one link; sends it again when it changed while
/// being sent, and reports it gone when it was deleted.
async fn upload_file(
    transfer: &Transfer<'_>,
    mut file: LocalFile,
    reuse: &ReuseIndex,
    part_size: u64,
    checksum_readers: &Semaphore,
) -> Result<FileOutcome, UploadError> {
    if let Some(target) = &file.link {
        transfer.progress.file_done();
        return Ok(FileOutcome::Stored(link_entry(&file, target), false));
    }
    for attempt in 1..=FILE_ATTEMPTS {
        if attempt > 1 {
            match stamp_again(&file)? {
                Some(now) => file.stamp = now,
                None => return Ok(FileOutcome::Vanished(file.path)),
            }
        }
        let sent = if file.stamp.size <= SMALL_FILE {
            send_small(transfer, &file, reuse).await
        } else {
            send_large(transfer, &file, reuse, part_size, checksum_readers).await
        };
        let (entry, reused) = match sent? {
            Attempt::Sent(entry, reused) => (entry, reused),
            Attempt::Gone => return Ok(FileOutcome::Vanished(file.path)),
            Attempt::Changed => {
                tracing::info!(path = %file.path, attempt, "replaced or resized since it was found; sending it again");
                continue;
            }
        };
        // The bytes read and sent must be the bytes of one version of the file.
        match stamp_again(&file)? {
            Some(after) if after == file.stamp => {
                transfer.progress.file_done();
                return Ok(FileOutcome::Stored(entry, reused));
            }
            Some(_) => {
                tracing::info!(path = %file.path, attempt, "changed while it was being sent; sending it again");
                ::metrics::counter!(crate::metrics::RETRIES).increment(1);
            }
            None => return Ok(FileOutcome::Vanished(file.path)),
        }
    }
    Err(UploadError::FileChanged { path: file.path })
}

/// The stamp of `file` now; `None` when it is gone or no longer a regular file (a link, a
/// directory or a device now: not the file that was being uploaded).
fn stamp_again(file: &LocalFile) -> Result<Option<FileStamp>, UploadError> {
    match FileStamp::of(&file.abs_path) {
        Ok(now) if now.mode & nix::libc::S_IFMT == nix::libc::S_IFREG => Ok(Some(now)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(UploadError::ReadFile {
            path: file.abs_path.clone(),
            source,
        }),
    }
}

/// The manifest entry of a link.
fn link_entry(file: &LocalFile, target: &str) -> ManifestFile {
    ManifestFile {
        path: file.path.clone(),
        size: 0,
        mode: file.stamp.permissions(),
        crc32c: format_crc32c(0),
        crc64nvme: None,
        key: String::new(),
        link: Some(target.to_owned()),
    }
}

/// The manifest entry of a file whose bytes (with checksums `crc`) are at `key`.
fn stored_entry(file: &LocalFile, key: String, crc: Checksums) -> ManifestFile {
    ManifestFile {
        path: file.path.clone(),
        size: file.stamp.size,
        mode: file.stamp.permissions(),
        crc32c: format_crc32c(crc.crc32c),
        crc64nvme: Some(format_crc64(crc.crc64nvme)),
        key,
        link: None,
    }
}

/// Sends a file larger than [`SMALL_FILE`] (streamed from disk, in parts when it is larger
/// than a part) unless an earlier object holds the same content.
async fn send_large(
    transfer: &Transfer<'_>,
    file: &LocalFile,
    reuse: &ReuseIndex,
    part_size: u64,
    checksum_readers: &Semaphore,
) -> Result<Attempt, UploadError> {
    let _slot = take_slot(&transfer.large_files).await?;
    let opened = match OpenedFile::open(file) {
        Ok(opened) => opened,
        Err(failure) => return failure.ends_attempt(&file.abs_path),
    };
    let size = file.stamp.size;
    let plan = PartPlan::for_file(size, part_size).ok_or_else(|| UploadError::TooLarge {
        path: file.path.clone(),
        size,
    })?;
    let mut known_crcs = None;
    if reuse.has_size(size) {
        let crcs = checksum_first(file, &opened, plan, checksum_readers).await?;
        let crc = combine_part_crcs(&plan, &crcs);
        if let Some(key) = reuse.key_of(size, crc) {
            transfer.progress.add_reused(size);
            return Ok(Attempt::Sent(stored_entry(file, key.to_owned(), crc), true));
        }
        known_crcs = Some(crcs);
    }
    let key = format!("{}{}", transfer.objects_prefix, file.path);
    let crc = send_file(transfer, file, &opened.read_path, &key, plan, known_crcs).await?;
    Ok(Attempt::Sent(stored_entry(file, key, crc), false))
}

/// The part checksums of a file that may be reused, read before it is sent (at most
/// [`CHECKSUM_READERS`] files at a time).
async fn checksum_first(
    file: &LocalFile,
    opened: &OpenedFile,
    plan: PartPlan,
    checksum_readers: &Semaphore,
) -> Result<Vec<Checksums>, UploadError> {
    let _reader = take_slot(checksum_readers).await?;
    let path = opened.read_path.clone();
    tokio::task::spawn_blocking(move || checksum_parts(&path, &plan))
        .await
        .map_err(std::io::Error::other)
        .and_then(|read| read)
        .map_err(|source| UploadError::ReadFile {
            path: file.abs_path.clone(),
            source,
        })
}

/// A slot of one of the upload's bounds. The semaphores are never closed while a transfer
/// runs; a closed one would mean the upload is being torn down.
async fn take_slot(bound: &Semaphore) -> Result<tokio::sync::SemaphorePermit<'_>, UploadError> {
    bound.acquire().await.map_err(|_| UploadError::Cancelled)
}

/// Aborts every multipart upload this run opened, plus any the store lists under this
/// upload's `prefix` (one whose CreateMultipartUpload answer was lost), within
/// [`ABORT_TIMEOUT`].
async fn abort_open_uploads(store: &Store, prefix: &str, open: &OpenUploads) {
    let work = async {
        let mut uploads = open.take_all();
        match store
            .client()
            .list_multipart_uploads()
            .bucket(store.bucket())
            .prefix(prefix)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, path: &str) {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, b"x").expect("write");
    }

    fn paths_taken(dir: &Path, step: Option<u64>) -> (Vec<String>, Vec<String>) {
        let options = UploadOptions {
            context: ManifestContext {
                step,
                ..ManifestContext::default()
            },
            ..UploadOptions::default()
        };
        let scanned = scan_checkpoint(dir, &options).expect("scan");
        let files = scanned.files.into_iter().map(|f| f.path).collect();
        (files, scanned.left_out)
    }

    #[test]
    fn an_upload_of_step_5_leaves_out_checkpoint_6() {
        let dir = tempfile::tempdir().expect("tempdir");
        for path in [
            "checkpoint-4/model.safetensors",
            "checkpoint-5/model.safetensors",
            "checkpoint-5/trainer_state.json",
            "checkpoint-6/model.safetensors",
            "checkpoint-60-notes.txt",
            "config.json",
        ] {
            write(dir.path(), path);
        }
        let (files, left_out) = paths_taken(dir.path(), Some(5));
        assert_eq!(
            files,
            [
                "checkpoint-4/model.safetensors",
                "checkpoint-5/model.safetensors",
                "checkpoint-5/trainer_state.json",
                "checkpoint-60-notes.txt",
                "config.json",
            ]
        );
        assert_eq!(left_out, ["checkpoint-6"]);
    }

    #[test]
    fn an_upload_without_a_step_takes_every_step_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "checkpoint-5/model.safetensors");
        write(dir.path(), "checkpoint-6/model.safetensors");
        let (files, left_out) = paths_taken(dir.path(), None);
        assert_eq!(
            files,
            [
                "checkpoint-5/model.safetensors",
                "checkpoint-6/model.safetensors"
            ]
        );
        assert!(left_out.is_empty());
    }

    #[test]
    fn a_path_is_within_a_directory_only_at_a_segment_boundary() {
        assert!(is_within("checkpoint-6", "checkpoint-6"));
        assert!(is_within("checkpoint-6/a/b", "checkpoint-6"));
        assert!(!is_within("checkpoint-60/a", "checkpoint-6"));
        assert!(!is_within("checkpoint-6.txt", "checkpoint-6"));
    }
}
