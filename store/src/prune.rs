//! Pruning: keep the newest N committed generations and every object they reference.
//!
//! Order matters for readers running at the same time: old manifests go first (so no reader
//! picks a generation whose objects are about to vanish), then objects no kept manifest names.
//! Objects of generations newer than the newest manifest belong to an upload in progress and
//! are never touched. The same rule applies to multipart uploads left open by an upload that
//! was killed outright (SIGKILL, OOM, node loss), which cannot abort its own: prune aborts
//! those of generations not newer than the newest commit, so their parts stop costing storage.

use std::collections::HashSet;

use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use crate::generation::Generation;
use crate::list::in_step_order;
use crate::manifest::{MANIFEST_SUFFIX, ManifestReadError, fetch_manifest};
use crate::s3::{Operation, S3Error, Store, with_retries};

/// S3's limit on keys per DeleteObjects request.
const DELETE_BATCH: usize = 1000;
/// Pages of ListMultipartUploads (1,000 uploads each) read per prune: a bound, not a limit
/// anyone should reach with one writer per job; the rest waits for the next prune.
const MAX_UPLOAD_LISTING_PAGES: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneSummary {
    /// Generations whose manifests were deleted.
    pub generations_deleted: Vec<Generation>,
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

/// Deletes generations beyond the newest `keep` and objects no kept generation references.
/// With `dry_run`, only reports what would go.
#[tracing::instrument(skip_all, fields(bucket = store.bucket(), prefix = store.generations_prefix(), keep), err(Display))]
pub async fn prune_generations(
    store: &Store,
    keep: usize,
    dry_run: bool,
) -> Result<PruneSummary, PruneError> {
    let keep = keep.max(1);
    let prefix = store.generations_prefix();
    let objects = store.list_objects(prefix).await.map_err(PruneError::List)?;
    let mut committed: Vec<Generation> = objects
        .iter()
        .filter_map(|(key, _)| {
            let name = key.strip_prefix(prefix)?.strip_suffix(MANIFEST_SUFFIX)?;
            Generation::parse(name).ok()
        })
        .collect();
    committed.sort();
    // The most recently started commit: objects of later generations belong to an upload in
    // progress.
    let Some(newest) = committed.last().cloned() else {
        return Ok(PruneSummary::default());
    };
    // Which to keep goes by step (see `crate::list`), not by the writers' clocks.
    let committed: Vec<Generation> = in_step_order(store, committed)
        .await
        .map_err(PruneError::Order)?
        .into_iter()
        .map(|c| c.generation)
        .collect();
    let split = committed.len().saturating_sub(keep);
    let (deleted, kept) = committed.split_at(split);

    // Everything the kept generations need. Reading them all before deleting anything means a
    // broken kept manifest stops the prune instead of orphaning its objects' neighbours.
    let mut referenced: HashSet<String> = HashSet::new();
    for generation in kept {
        let manifest =
            fetch_manifest(store, generation)
                .await
                .map_err(|source| PruneError::Manifest {
                    generation: generation.clone(),
                    source,
                })?;
        referenced.extend(manifest.files.into_iter().map(|f| f.key));
        referenced.insert(store.manifest_key(generation));
    }

    let old_manifests: Vec<String> = deleted.iter().map(|g| store.manifest_key(g)).collect();
    let mut garbage: Vec<(String, u64)> = Vec::new();
    for (key, size) in &objects {
        if referenced.contains(key) || old_manifests.contains(key) {
            continue;
        }
        // Objects of an upload newer than the newest commit: still in progress.
        match store.generation_of_key(key) {
            Some(generation) if generation <= newest => garbage.push((key.clone(), *size)),
            _ => {}
        }
    }
    let stale_uploads = stale_multipart_uploads(store, &newest).await;
    let summary = PruneSummary {
        generations_deleted: deleted.to_vec(),
        generations_kept: kept.to_vec(),
        objects_deleted: garbage.len(),
        bytes_deleted: garbage.iter().map(|(_, size)| size).sum(),
        uploads_aborted: stale_uploads.len(),
    };
    if dry_run {
        return Ok(summary);
    }
    delete_keys(store, &old_manifests).await?;
    let garbage_keys: Vec<String> = garbage.into_iter().map(|(key, _)| key).collect();
    delete_keys(store, &garbage_keys).await?;
    abort_uploads(store, &stale_uploads).await?;
    Ok(summary)
}

/// Open multipart uploads under the job whose generation is not newer than `newest`, as
/// `(key, upload id)`. A store that cannot list them (some S3-compatible ones) gets a warning
/// and its bucket lifecycle rule does the job instead.
async fn stale_multipart_uploads(store: &Store, newest: &Generation) -> Vec<(String, String)> {
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
                && store.generation_of_key(key).is_some_and(|g| &g <= newest)
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
