//! Pruning: keep the newest N committed generations and every object they reference.
//!
//! Order matters for readers running at the same time: old manifests go first (so no reader
//! picks a generation whose objects are about to vanish), then objects no kept manifest names.
//! Objects of uploads in progress are never touched: a single pod's generation newer than the
//! newest commit, or a multi-pod generation above the newest complete step, or one whose
//! objects are younger than [`INCOMPLETE_GRACE`] (a slow rank still writing its part). A
//! multi-pod generation older than the newest complete one whose parts never all arrived (a
//! rank killed mid-upload) is deleted. The same rules apply to multipart uploads left open by
//! an upload that was killed outright (SIGKILL, OOM, node loss), which cannot abort its own.
//!
//! Memory does not grow with the number of objects: the generations are found with a
//! delimited listing (one entry per generation), and the objects are listed page by page and
//! deleted a batch at a time. What is held is the set of keys the kept manifests reference.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use crate::generation::Generation;
use crate::list::{in_step_order, list_generation_level};
use crate::manifest::{ManifestFile, ManifestReadError, fold_manifest};
use crate::part::{GenerationManifest, JOB_MANIFEST_KIND, fetch_generation};
use crate::s3::{Operation, S3Error, Store, with_retries};

/// S3's limit on keys per DeleteObjects request.
const DELETE_BATCH: usize = 1000;
/// Pages of ListMultipartUploads (1,000 uploads each) read per prune: a bound, not a limit
/// anyone should reach with one writer per rank; the rest waits for the next prune.
const MAX_UPLOAD_LISTING_PAGES: usize = 100;
/// An incomplete multi-pod generation with an object younger than this is still being
/// written (a rank slow to upload its part) and survives a prune. An hour is far beyond any
/// notice window and any part upload.
pub const INCOMPLETE_GRACE: Duration = Duration::from_secs(3600);

/// What to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Committed generations to keep (the newest by step); at least 1.
    pub keep: usize,
    /// Say what would go without deleting anything.
    pub dry_run: bool,
    /// See [`INCOMPLETE_GRACE`].
    pub incomplete_grace: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneSummary {
    /// Committed generations whose manifests were deleted.
    pub generations_deleted: Vec<Generation>,
    /// Multi-pod generations some rank never committed, older than the newest complete one,
    /// deleted with their parts.
    pub incomplete_deleted: Vec<Generation>,
    /// Generations kept, oldest first.
    pub generations_kept: Vec<Generation>,
    pub objects_deleted: usize,
    pub bytes_deleted: u64,
    /// Multipart uploads of killed uploads that were aborted (or would be, with dry run).
    pub uploads_aborted: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("listing the job's objects")]
    List(#[source] S3Error),
    #[error("reading the manifest of kept generation {generation}; nothing was deleted")]
    Manifest {
        generation: Generation,
        #[source]
        source: ManifestReadError,
    },
    #[error("deleting objects")]
    Delete(#[source] S3Error),
    #[error("ordering the committed generations by step; nothing was deleted")]
    Order(#[source] crate::list::ListError),
    #[error("aborting a multipart upload left open by a killed upload")]
    Abort(#[source] S3Error),
    #[error("building a DeleteObjects request")]
    Build(#[source] aws_sdk_s3::error::BuildError),
    #[error("the store refused to delete {key}: {code} {message}")]
    DeleteRefused {
        key: String,
        code: String,
        message: String,
    },
}

/// The job's generations: committed ones, and all with objects.
struct Overview {
    committed: Vec<Generation>,
    started: Vec<Generation>,
}

/// What a prune does with a generation's objects that no kept manifest references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Committed (kept or pruned) or abandoned: unreferenced objects go.
    Collect,
    /// An upload in progress: nothing of it is touched.
    Spare,
}

/// Deletes generations beyond the newest `keep` and objects no kept generation references.
/// With `dry_run`, only reports what would go.
#[tracing::instrument(skip_all, fields(bucket = store.bucket(), prefix = store.generations_prefix(), keep = options.keep), err(Display))]
pub async fn prune_generations(
    store: &Store,
    options: &PruneOptions,
) -> Result<PruneSummary, PruneError> {
    let (keep, dry_run) = (options.keep.max(1), options.dry_run);
    let listing = list_generation_level(store)
        .await
        .map_err(PruneError::List)?;
    let overview = Overview {
        committed: listing.committed_ids(),
        started: listing.started,
    };
    if overview.committed.is_empty() {
        return Ok(PruneSummary::default());
    }
    // Which to keep goes by step (see `crate::list`), not by the writers' clocks.
    let ordered: Vec<Generation> = in_step_order(store, overview.committed.clone())
        .await
        .map_err(PruneError::Order)?
        .into_iter()
        .map(|c| c.generation)
        .collect();
    let split = ordered.len().saturating_sub(keep);
    let (deleted, kept) = ordered.split_at(split);
    let mut fates = fates(store, &overview, options.incomplete_grace).await?;

    // Everything the kept generations need, and what uploads in progress may reuse. Reading
    // them all before deleting anything means a broken kept manifest stops the prune instead
    // of orphaning its objects' neighbours.
    let mut referenced: HashSet<String> = HashSet::new();
    for generation in kept {
        referenced.extend(references(store, generation).await?);
    }
    for (generation, fate) in &fates {
        if *fate == Fate::Spare {
            referenced.extend(part_references(store, generation).await?);
        }
    }
    let incomplete_deleted: Vec<Generation> = fates
        .iter()
        .filter(|(g, fate)| **fate == Fate::Collect && !overview.committed.contains(g))
        .map(|(g, _)| g.clone())
        .collect();
    for generation in &overview.committed {
        fates.insert(generation.clone(), Fate::Collect);
    }
    let old_manifests: Vec<String> = deleted.iter().map(|g| store.manifest_key(g)).collect();
    if !dry_run {
        delete_keys(store, &old_manifests).await?;
    }
    let newest_single = overview
        .committed
        .iter()
        .filter(|g| g.step().is_none())
        .max()
        .cloned();
    let collectable = |generation: &Generation| match fates.get(generation) {
        Some(fate) => *fate == Fate::Collect,
        // Leftovers of a single pod's upload that never committed: older than the newest
        // commit means abandoned; newer means in progress.
        None => {
            generation.step().is_none() && newest_single.as_ref().is_some_and(|n| generation <= n)
        }
    };
    let (objects_deleted, bytes_deleted) =
        collect_garbage(store, &referenced, &old_manifests, &collectable, dry_run).await?;
    let stale_uploads = stale_multipart_uploads(store, &collectable).await;
    if !dry_run {
        abort_uploads(store, &stale_uploads).await?;
    }
    Ok(PruneSummary {
        generations_deleted: deleted.to_vec(),
        incomplete_deleted,
        generations_kept: kept.to_vec(),
        objects_deleted,
        bytes_deleted,
        uploads_aborted: stale_uploads.len(),
    })
}

/// The fate of each multi-pod generation that is not committed: spared while it may still be
/// in progress (above the newest complete step, or an object younger than `grace`), collected
/// otherwise.
async fn fates(
    store: &Store,
    overview: &Overview,
    grace: Duration,
) -> Result<HashMap<Generation, Fate>, PruneError> {
    let newest_complete = overview.committed.iter().filter_map(Generation::step).max();
    let mut fates = HashMap::new();
    for generation in &overview.started {
        let Some(step) = generation.step() else {
            continue;
        };
        if overview.committed.contains(generation) {
            continue;
        }
        let in_progress = newest_complete.is_none_or(|newest| step > newest)
            || newest_object_age(store, generation).await? < grace;
        let fate = if in_progress {
            Fate::Spare
        } else {
            Fate::Collect
        };
        fates.insert(generation.clone(), fate);
    }
    Ok(fates)
}

/// How long ago the newest object of `generation` was written.
async fn newest_object_age(store: &Store, generation: &Generation) -> Result<Duration, PruneError> {
    let prefix = store.objects_prefix(generation);
    let mut newest = 0i64;
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(&prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| PruneError::List(store.error(Operation::ListObjectsV2, &prefix, e)))?;
        for object in page.contents() {
            newest = newest.max(object.last_modified().map_or(0, |t| t.secs()));
        }
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Ok(Duration::from_secs(
        u64::try_from(now - newest).unwrap_or(0),
    ))
}

/// Every key a committed generation needs: its manifest, its parts' manifests, their files.
/// Each manifest is read entry by entry; only the keys are kept.
async fn references(store: &Store, generation: &Generation) -> Result<Vec<String>, PruneError> {
    let error = |source| PruneError::Manifest {
        generation: generation.clone(),
        source,
    };
    let key = store.manifest_key(generation);
    let (head, mut keys) = fold_manifest(store, &key, generation, Vec::new, add_key)
        .await
        .map_err(error)?;
    keys.push(key);
    if head.kind.as_deref() == Some(JOB_MANIFEST_KIND) {
        let GenerationManifest::Job(job) =
            fetch_generation(store, generation).await.map_err(error)?
        else {
            return Ok(keys);
        };
        for part in job.parts {
            keys.extend(part_keys(store, &part.manifest, generation).await?);
            keys.push(part.manifest);
        }
    }
    Ok(keys)
}

/// The keys of the files a part manifest at `key` names.
async fn part_keys(
    store: &Store,
    key: &str,
    generation: &Generation,
) -> Result<Vec<String>, PruneError> {
    let (_, keys) = fold_manifest(store, key, generation, Vec::new, add_key)
        .await
        .map_err(|source| PruneError::Manifest {
            generation: generation.clone(),
            source,
        })?;
    Ok(keys)
}

fn add_key(keys: &mut Vec<String>, file: ManifestFile) {
    if !file.key.is_empty() {
        keys.push(file.key);
    }
}

/// The keys the committed parts of an in-progress multi-pod generation name (their files may
/// be reused from older generations).
async fn part_references(
    store: &Store,
    generation: &Generation,
) -> Result<Vec<String>, PruneError> {
    let mut keys = Vec::new();
    let ranks = crate::part::committed_ranks(store, generation)
        .await
        .map_err(PruneError::List)?;
    for rank in ranks {
        let key = store.part_manifest_key(generation, rank);
        keys.extend(part_keys(store, &key, generation).await?);
        keys.push(key);
    }
    Ok(keys)
}

/// Lists the job's objects page by page and deletes (a batch at a time) those that nothing
/// kept references and whose generation `collectable` accepts; returns their count and bytes.
async fn collect_garbage(
    store: &Store,
    referenced: &HashSet<String>,
    old_manifests: &[String],
    collectable: &dyn Fn(&Generation) -> bool,
    dry_run: bool,
) -> Result<(usize, u64), PruneError> {
    let prefix = store.generations_prefix();
    let (mut count, mut bytes) = (0usize, 0u64);
    let mut batch: Vec<String> = Vec::with_capacity(DELETE_BATCH);
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| PruneError::List(store.error(Operation::ListObjectsV2, prefix, e)))?;
        for object in page.contents() {
            let Some(key) = object.key() else { continue };
            if referenced.contains(key) || old_manifests.iter().any(|m| m == key) {
                continue;
            }
            if store
                .generation_of_key(key)
                .is_some_and(|g| collectable(&g))
            {
                count += 1;
                bytes += object
                    .size()
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0);
                batch.push(key.to_owned());
            }
        }
        if batch.len() >= DELETE_BATCH {
            if !dry_run {
                delete_keys(store, &batch).await?;
            }
            batch.clear();
        }
    }
    if !dry_run {
        delete_keys(store, &batch).await?;
    }
    Ok((count, bytes))
}

/// Open multipart uploads under the job whose generation `collectable` accepts, as
/// `(key, upload id)`. A store that cannot list them (some S3-compatible ones) gets a warning
/// and its bucket lifecycle rule does the job instead.
async fn stale_multipart_uploads(
    store: &Store,
    collectable: &dyn Fn(&Generation) -> bool,
) -> Vec<(String, String)> {
    let prefix = store.generations_prefix();
    let mut stale = Vec::new();
    let (mut key_marker, mut upload_id_marker) = (None::<String>, None::<String>);
    for _page in 0..MAX_UPLOAD_LISTING_PAGES {
        let listing = store
            .client()
            .list_multipart_uploads()
            .bucket(store.bucket())
            .prefix(prefix)
            .set_key_marker(key_marker.take())
            .set_upload_id_marker(upload_id_marker.take())
            .send()
            .await;
        let listing = match listing {
            Ok(listing) => listing,
            Err(err) => {
                let err = store.error(Operation::ListMultipartUploads, prefix, err);
                tracing::warn!(
                    "{err:#}; multipart uploads left open by killed uploads stay until the \
                     bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes them"
                );
                break;
            }
        };
        for upload in listing.uploads() {
            if let (Some(key), Some(id)) = (upload.key(), upload.upload_id())
                && store
                    .generation_of_key(key)
                    .is_some_and(|g| collectable(&g))
            {
                stale.push((key.to_owned(), id.to_owned()));
            }
        }
        if listing.is_truncated() != Some(true) {
            break;
        }
        key_marker = listing.next_key_marker().map(str::to_owned);
        upload_id_marker = listing.next_upload_id_marker().map(str::to_owned);
    }
    stale
}

async fn abort_uploads(store: &Store, uploads: &[(String, String)]) -> Result<(), PruneError> {
    for (key, upload_id) in uploads {
        let result = with_retries(
            "aborting a multipart upload",
            S3Error::is_retryable,
            |_| async {
                store
                    .client()
                    .abort_multipart_upload()
                    .bucket(store.bucket())
                    .key(key)
                    .upload_id(upload_id)
                    .send()
                    .await
                    .map_err(|e| store.error(Operation::AbortMultipartUpload, key, e))
            },
        )
        .await;
        match result {
            Ok(_) => tracing::debug!(%key, "aborted a multipart upload left open"),
            // Completed or aborted since the listing: nothing left to clean.
            Err(err) if err.is_not_found() => {}
            Err(err) => return Err(PruneError::Abort(err)),
        }
    }
    Ok(())
}

async fn delete_keys(store: &Store, keys: &[String]) -> Result<(), PruneError> {
    for batch in keys.chunks(DELETE_BATCH) {
        let objects: Vec<ObjectIdentifier> = batch
            .iter()
            .filter_map(|key| ObjectIdentifier::builder().key(key).build().ok())
            .collect();
        let first = batch.first().cloned().unwrap_or_default();
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(PruneError::Build)?;
        let output = with_retries("deleting objects", S3Error::is_retryable, |_| {
            let (delete, first) = (delete.clone(), first.clone());
            async move {
                store
                    .client()
                    .delete_objects()
                    .bucket(store.bucket())
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|e| store.error(Operation::DeleteObjects, &first, e))
            }
        })
        .await
        .map_err(PruneError::Delete)?;
        if let Some(error) = output
            .errors()
            .iter()
            .find(|e| e.code() != Some("NoSuchKey"))
        {
            return Err(PruneError::DeleteRefused {
                key: error.key().unwrap_or_default().to_owned(),
                code: error.code().unwrap_or_default().to_owned(),
                message: error.message().unwrap_or_default().to_owned(),
            });
        }
    }
    Ok(())
}
