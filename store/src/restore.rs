//! Restoring a committed generation into the checkpoint directory.
//!
//! The manifest is validated before anything touches the disk (no absolute paths, no `..`, no
//! duplicates, no keys outside the job, no links out). If `--dir` already holds a checkpoint of
//! the generation's step or a newer one (a volume that outlived its pod), it is left alone.
//! Otherwise files are downloaded into a staging directory, every one verified against the
//! manifest's size and checksums (CRC32C, and CRC-64/NVME where recorded), links recreated,
//! permissions set without setuid, setgid or sticky bits (and ownership given to the trainer's
//! user when restore runs as root), the local files excluded from checkpoints (logs) carried
//! over, and only then swapped into place ([`staging`]); on any failure before the swap the
//! staging directory is removed and `--dir` is left exactly as it was.

mod download;
mod staging;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

pub use staging::Staging;

use crate::exclude::Excludes;
use crate::generation::Generation;
use crate::list::{ListError, committed_in_step_order, list_generations};
use crate::manifest::{Manifest, ManifestReadError};
use crate::part::{
    GenerationManifest, PartsChoice, PartsDisagree, fetch_generation, fetch_parts, merge_parts,
};
use crate::progress::{Progress, format_bytes, mib_per_second};
use crate::s3::{S3Error, Store};
use crate::step::{Overrides, Step, StepPattern, newest_step_in_paths, settled_step};
use crate::{DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE};
use download::{Download, download_file};

/// Runtime worker threads for `nerve-sidecar restore`: one per core, but no more than the
/// requests in flight, since each range is a task and more workers than ranges only wake up to
/// find nothing to do. Every range's receive, checksum and page-cache write is CPU work, and
/// restore has the node to itself (it runs before the trainer starts): against the bench
/// server, 2 workers on 2 cores restored the DCP set in 0.73 s wall and 0.62 CPU s, against
/// 0.90 s and 0.86 CPU s on one worker, where the single thread fell behind the sockets.
pub fn worker_threads(concurrency: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores.min(concurrency).max(1)
}

/// How to restore; [`RestoreOptions::default`] uses the command-line defaults.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// GETs in flight across all files and ranges.
    pub concurrency: usize,
    /// Files larger than this are fetched as parallel ranges of this size.
    pub range_size: u64,
    /// Local paths that are not checkpoint content: kept across the restore.
    pub excludes: Excludes,
    /// Names that carry a step, to read the step of the local checkpoint and the generation's.
    pub step_pattern: StepPattern,
    /// The done marker, whose `step=N` says which step the local checkpoint holds.
    pub marker: Option<PathBuf>,
    /// Who owns the restored files; `None` leaves them to the restoring process.
    pub owner: Option<Owner>,
    /// Restore even over a local checkpoint of the same or a newer step.
    pub overwrite_newer: bool,
    /// Of a multi-pod generation: every rank's files, or this rank's own.
    pub parts: PartsChoice,
    /// Of a multi-pod generation: the rank whose file wins when two ranks hold one path with
    /// different contents (otherwise an error).
    pub prefer_rank: Option<u32>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            concurrency: DEFAULT_CONCURRENCY,
            range_size: DEFAULT_PART_SIZE,
            excludes: Excludes::default(),
            step_pattern: StepPattern::default(),
            marker: None,
            owner: None,
            overwrite_newer: false,
            parts: PartsChoice::All,
            prefer_rank: None,
        }
    }
}

/// A user and group to own restored files and directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// Parses `UID` or `UID:GID` (numbers; the group defaults to the user's number).
    pub fn parse(value: &str) -> Result<Owner, String> {
        let (uid, gid) = value.split_once(':').unwrap_or((value, value));
        match (uid.parse(), gid.parse()) {
            (Ok(uid), Ok(gid)) => Ok(Owner { uid, gid }),
            _ => Err(format!(
                "`{value}` is not an owner; write a numeric UID or UID:GID, e.g. 1000:1000"
            )),
        }
    }

    /// Whom restored files should belong to when nobody said: nobody in particular unless this
    /// process runs as root, then the owner of `dir` (or of its parent when it does not exist
    /// yet), which is the trainer's user or its volume's group on every setup we know.
    pub fn default_for(dir: &Path) -> Option<Owner> {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let meta = std::fs::metadata(dir)
            .ok()
            .or_else(|| std::fs::metadata(dir.parent()?).ok())?;
        (meta.uid() != 0).then_some(Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

#[derive(Debug, Clone)]
pub enum RestoreOutcome {
    /// The job has no committed generation: nothing to restore.
    Nothing,
    Restored(RestoreSummary),
    /// `--dir` already holds a checkpoint of the generation's step or a newer one: untouched.
    KeptLocal {
        generation: Generation,
        generation_step: u64,
        local: Step,
    },
}

#[derive(Debug, Clone)]
pub struct RestoreSummary {
    pub generation: Generation,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl std::fmt::Display for RestoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "restored generation {}: {} files, {} downloaded, {:.1} s, {:.0} MiB/s",
            self.generation,
            self.files,
            format_bytes(self.bytes),
            self.seconds,
            mib_per_second(self.bytes, self.seconds)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("finding the newest committed generation")]
    List(#[source] Box<ListError>),
    #[error(
        "generation {0} has no manifest (never committed, or pruned); `nerve-sidecar list` shows what exists"
    )]
    NoSuchGeneration(Generation),
    #[error(
        "{dir}: {} free on its filesystem, generation {generation} needs {}; free space there \
         or restore onto a larger volume",
        format_bytes(*available),
        format_bytes(*needed)
    )]
    NoSpace {
        dir: PathBuf,
        generation: Generation,
        needed: u64,
        available: u64,
    },
    #[error("reading the manifest of generation {generation}")]
    Manifest {
        generation: Generation,
        #[source]
        source: Box<ManifestReadError>,
    },
    #[error("downloading {path}")]
    Download {
        path: String,
        #[source]
        source: S3Error,
    },
    #[error("reading the body of s3 object {key} for {path}")]
    Body {
        path: String,
        key: String,
        #[source]
        source: aws_sdk_s3::primitives::ByteStreamError,
    },
    #[error("{path}: object {key} does not have the {expected} bytes the manifest lists")]
    SizeMismatch {
        path: String,
        key: String,
        expected: u64,
    },
    #[error(
        "{path}: CRC32C of object {key} is {actual}, the manifest says {expected}; the stored \
         object is corrupt or was overwritten"
    )]
    ChecksumMismatch {
        path: String,
        key: String,
        expected: String,
        actual: String,
    },
    #[error("preparing the staging directory for {dir}")]
    Staging {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("moving the restored checkpoint into {dir}")]
    Swap {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore cancelled; {0} left as it was")]
    Cancelled(String),
    #[error("restoring multi-pod generation {generation}; nothing was restored")]
    PartsDisagree {
        generation: Generation,
        #[source]
        source: PartsDisagree,
    },
}

impl RestoreError {
    /// Fetching again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RestoreError::List(e) => e.is_retryable(),
            RestoreError::Download { source: e, .. } => e.is_retryable(),
            RestoreError::Manifest { source, .. } => source.is_retryable(),
            RestoreError::Body { .. } => true,
            _ => false,
        }
    }
}

/// Restores `generation` (or the newest committed one) into `dir` with default options.
pub async fn restore_generation(
    store: &Store,
    dir: &Path,
    generation: Option<Generation>,
) -> Result<RestoreOutcome, RestoreError> {
    restore_generation_with(
        store,
        dir,
        generation,
        &RestoreOptions::default(),
        &CancellationToken::new(),
        &Progress::new(),
    )
    .await
}

/// Restores `generation` (or the newest committed one) into `dir`. On any error or
/// cancellation `dir` is left as it was.
pub async fn restore_generation_with(
    store: &Store,
    dir: &Path,
    generation: Option<Generation>,
    options: &RestoreOptions,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<RestoreOutcome, RestoreError> {
    // Boxed: the SDK's futures nest deeply, and callers embed this one in their own.
    let result = Box::pin(restore(store, dir, generation, options, cancel, progress)).await;
    let outcome = match &result {
        Ok(RestoreOutcome::Nothing) => "nothing",
        Ok(RestoreOutcome::Restored(_)) => "restored",
        Ok(RestoreOutcome::KeptLocal { .. }) => "kept-local",
        Err(_) => "failed",
    };
    ::metrics::counter!(crate::metrics::RESTORES, "outcome" => outcome).increment(1);
    result
}

#[tracing::instrument(skip_all, fields(dir = %dir.display(), bucket = store.bucket(), prefix = store.generations_prefix()), err(Display))]
async fn restore(
    store: &Store,
    dir: &Path,
    generation: Option<Generation>,
    options: &RestoreOptions,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    let generation = match generation {
        Some(wanted) => {
            let committed = list_generations(store)
                .await
                .map_err(|e| RestoreError::List(Box::new(ListError::List(e))))?;
            if !committed.contains(&wanted) {
                return Err(RestoreError::NoSuchGeneration(wanted));
            }
            wanted
        }
        None => match committed_in_step_order(store)
            .await
            .map_err(|e| RestoreError::List(Box::new(e)))?
            .pop()
        {
            Some(newest) => newest.generation,
            None => return Ok(RestoreOutcome::Nothing),
        },
    };
    let manifest = restore_plan(store, &generation, options).await?;
    if !options.overwrite_newer
        && let Some(kept) = newer_local(dir, &generation, &manifest, options).await
    {
        return Ok(kept);
    }
    progress.add_total(manifest.files.len() as u64, manifest.total_bytes());
    tracing::info!(%generation, files = manifest.files.len(), bytes = manifest.total_bytes(), "restoring");

    let staging = {
        let (owned_dir, generation) = (dir.to_path_buf(), generation.clone());
        tokio::task::spawn_blocking(move || Staging::create(&owned_dir, &generation))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| RestoreError::Staging {
                dir: dir.to_path_buf(),
                source,
            })?
    };
    // Both the previous contents and the new generation are on disk until the swap.
    if let Some(available) = staging.available_bytes()
        && available < manifest.total_bytes()
    {
        let err = RestoreError::NoSpace {
            dir: dir.to_path_buf(),
            generation,
            needed: manifest.total_bytes(),
            available,
        };
        let _ = tokio::task::spawn_blocking(move || staging.discard()).await;
        return Err(err);
    }
    let manifest = Arc::new(manifest);
    let result = tokio::select! {
        result = download_files(store, &staging, &manifest, options, progress) => result,
        () = cancel.cancelled() => Err(RestoreError::Cancelled(dir.display().to_string())),
    };
    let result = result.and_then(|()| {
        if cancel.is_cancelled() {
            Err(RestoreError::Cancelled(dir.display().to_string()))
        } else {
            Ok(())
        }
    });
    let staging = Arc::new(staging);
    let finished = match result {
        Ok(()) => {
            let (staging, manifest, options) = (staging.clone(), manifest.clone(), options.clone());
            let owned_dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                finish_staging(&staging, &manifest, &options, &owned_dir)
            })
            .await
            .unwrap_or_else(|e| {
                Err(RestoreError::Staging {
                    dir: dir.to_path_buf(),
                    source: std::io::Error::other(e),
                })
            })
        }
        Err(err) => Err(err),
    };
    if let Err(err) = finished {
        let staging_dir = staging.path.clone();
        let _ = tokio::task::spawn_blocking(move || staging.discard()).await;
        tracing::debug!(path = %staging_dir.display(), "removed the staging directory");
        return Err(err);
    }
    let swapped = tokio::task::spawn_blocking(move || staging.swap_into_place())
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    swapped.map_err(|source| RestoreError::Swap {
        dir: dir.to_path_buf(),
        source,
    })?;
    let seconds = started.elapsed().as_secs_f64();
    ::metrics::counter!(crate::metrics::TRANSFER_BYTES, "direction" => "download")
        .increment(manifest.total_bytes());
    ::metrics::histogram!(crate::metrics::RESTORE_DURATION).record(seconds);
    Ok(RestoreOutcome::Restored(RestoreSummary {
        generation,
        files: manifest.files.len(),
        bytes: manifest.total_bytes(),
        seconds,
    }))
}

/// Creates every directory of the generation in staging, then downloads every file into it.
///
/// Each file is a task (so every runtime worker fetches, checks and writes), spawned when a
/// slot frees up rather than all up front, and aborted when dropped (another file failed).
async fn download_files(
    store: &Store,
    staging: &Staging,
    manifest: &Arc<Manifest>,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<(), RestoreError> {
    let (root, dirs_of) = (staging.path.clone(), manifest.clone());
    tokio::task::spawn_blocking(move || create_directories(&root, &dirs_of))
        .await
        .map_err(std::io::Error::other)
        .and_then(|created| created)
        .map_err(|source| RestoreError::Write {
            path: staging.path.clone(),
            source,
        })?;
    let download = Arc::new(Download::new(store, manifest, options, progress));
    futures::stream::iter(0..manifest.files.len())
        .filter(|&at| std::future::ready(manifest.files[at].link.is_none()))
        .map(|at| {
            let (download, manifest) = (download.clone(), manifest.clone());
            let dest = staging.file_path(&manifest.files[at].path);
            AbortOnDropHandle::new(tokio::spawn(async move {
                download_file(&download, &manifest.files[at], dest).await
            }))
        })
        .buffer_unordered(download.files_in_flight)
        .map(|joined| {
            joined.map_err(|e| RestoreError::Staging {
                dir: staging.path.clone(),
                source: std::io::Error::other(e),
            })?
        })
        .try_collect()
        .await
}

/// Creates the directory of every file and link of `manifest` under `root`, each once,
/// parents first (sorted, `a` before `a/b`) (blocking).
fn create_directories(root: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let dirs: std::collections::BTreeSet<&str> = manifest
        .files
        .iter()
        .filter_map(|file| file.path.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    let mut created: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for dir in dirs {
        // Every ancestor too: a directory holding only directories has no file of its own.
        let ends = dir.match_indices('/').map(|(at, _)| at).chain([dir.len()]);
        for end in ends {
            let path = &dir[..end];
            if !created.insert(path) {
                continue;
            }
            match std::fs::create_dir(root.join(path)) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// What restoring `generation` brings into `--dir`: a single pod's manifest, or the parts of a
/// multi-pod generation merged into one (every rank's files, or this rank's with `--parts own`;
/// two ranks holding one path with different contents is an error naming both), validated as
/// a whole.
async fn restore_plan(
    store: &Store,
    generation: &Generation,
    options: &RestoreOptions,
) -> Result<Manifest, RestoreError> {
    let read_error = |source| RestoreError::Manifest {
        generation: generation.clone(),
        source: Box::new(source),
    };
    let job = match fetch_generation(store, generation)
        .await
        .map_err(read_error)?
    {
        GenerationManifest::Single(manifest) => return Ok(manifest),
        GenerationManifest::Job(job) => job,
    };
    let parts = fetch_parts(store, generation, &job)
        .await
        .map_err(read_error)?;
    let files = merge_parts(&parts, options.parts, options.prefer_rank).map_err(|source| {
        RestoreError::PartsDisagree {
            generation: generation.clone(),
            source,
        }
    })?;
    let merged = Manifest {
        version: parts.iter().map(|p| p.version).max().unwrap_or(1),
        generation: generation.to_string(),
        job: job.job.clone(),
        created_at: parts
            .iter()
            .map(|p| p.created_at.clone())
            .max()
            .unwrap_or_default(),
        node: None,
        pod: None,
        step: Some(job.step),
        notice: None,
        rank: None,
        world_size: Some(job.world_size),
        files,
    };
    // Each part was validated alone; a file of one rank that is a directory of another's is
    // only seen together.
    merged
        .validate(generation, store.generations_prefix())
        .map_err(|source| {
            read_error(ManifestReadError::Invalid {
                bucket: store.bucket().to_owned(),
                key: store.manifest_key(generation),
                source,
            })
        })?;
    tracing::info!(%generation, world_size = job.world_size, parts = ?options.parts, "restoring a multi-pod generation");
    Ok(merged)
}

/// The local checkpoint, when `dir` already holds one of `manifest`'s step or a newer one.
async fn newer_local(
    dir: &Path,
    generation: &Generation,
    manifest: &Manifest,
    options: &RestoreOptions,
) -> Option<RestoreOutcome> {
    let generation_step = manifest.step.or_else(|| {
        newest_step_in_paths(
            manifest.files.iter().map(|f| f.path.as_str()),
            &options.step_pattern,
        )
    })?;
    let (owned_dir, options) = (dir.to_path_buf(), options.clone());
    let local = tokio::task::spawn_blocking(move || {
        settled_step(
            &owned_dir,
            options.marker.as_deref(),
            &options.step_pattern,
            &options.excludes,
            Overrides::NotTorn,
        )
    })
    .await
    .ok()??;
    if local.step < generation_step {
        tracing::info!(%generation, generation_step, local_step = local.step, "the generation is newer than the local checkpoint; restoring it");
        return None;
    }
    Some(RestoreOutcome::KeptLocal {
        generation: generation.clone(),
        generation_step,
        local,
    })
}

/// After every file is in staging and verified: the links, the owner of every directory, and
/// the local files excluded from checkpoints (blocking).
fn finish_staging(
    staging: &Staging,
    manifest: &Manifest,
    options: &RestoreOptions,
    dir: &Path,
) -> Result<(), RestoreError> {
    let staging_error = |source| RestoreError::Staging {
        dir: dir.to_path_buf(),
        source,
    };
    for file in &manifest.files {
        let Some(target) = &file.link else { continue };
        let at = staging.file_path(&file.path);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(staging_error)?;
        }
        std::os::unix::fs::symlink(target, &at).map_err(|source| RestoreError::Write {
            path: at.clone(),
            source,
        })?;
    }
    if let Some(owner) = options.owner {
        own_tree(&staging.path, owner).map_err(staging_error)?;
    }
    let carried = staging
        .carry_excluded(&options.excludes)
        .map_err(staging_error)?;
    if carried > 0 {
        tracing::info!(
            entries = carried,
            "kept the local files excluded from checkpoints (logs)"
        );
    }
    Ok(())
}

/// Gives every directory and link under `root` (files got theirs as they were written) to
/// `owner`.
fn own_tree(root: &Path, owner: Owner) -> std::io::Result<()> {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        std::os::unix::fs::lchown(&dir, Some(owner.uid), Some(owner.gid))?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_symlink() {
                std::os::unix::fs::lchown(entry.path(), Some(owner.uid), Some(owner.gid))?;
            }
        }
    }
    Ok(())
}
