//! Listing a job's committed generations (those whose manifest exists), oldest first.
//!
//! A generation id starts with the writer's clock at upload start, so key order is time order
//! on that writer's clock. "Newest" for restore and prune means the newest *step*: a pod whose
//! clock is off, or an old pod still uploading after its successor restored and trained on,
//! must not put an older step in front. [`committed_in_step_order`] orders by the step every
//! manifest records (in its `x-amz-meta-nerve-step` metadata, read with a HEAD; in its body for
//! manifests written before that), with time breaking ties, and falls back to time order when
//! some generation does not know its step.

use futures::{StreamExt, TryStreamExt};

use crate::generation::Generation;
use crate::manifest::{MANIFEST_SUFFIX, ManifestReadError, STEP_METADATA, fold_manifest};
use crate::part::{GenerationManifest, JOB_MANIFEST_KIND, committed_ranks, fetch_generation};
use crate::s3::{Operation, S3Error, Store, with_retries};

/// Manifest HEADs in flight while reading steps: tiny requests, latency-bound.
const STEP_LOOKUPS: usize = 16;

/// A committed generation and the training step its manifest records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub generation: Generation,
    pub step: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("listing committed generations")]
    List(#[source] S3Error),
    #[error("reading the step of generation {generation}")]
    Step {
        generation: Generation,
        #[source]
        source: ManifestReadError,
    },
}

impl ListError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ListError::List(e) => e.is_retryable(),
            ListError::Step { source, .. } => source.is_retryable(),
        }
    }
}

/// The job's generations as one delimited listing of `<prefix>/<job>/gen/` shows them: one
/// entry per generation, not per file.
#[derive(Debug, Default)]
pub struct GenerationListing {
    /// Generations whose manifest (a multi-pod job's: its job manifest) exists, oldest id
    /// first, with when the store wrote it (Unix seconds).
    pub committed: Vec<(Generation, i64)>,
    /// Generations with objects (a `gen/<G>/` prefix), committed or not.
    pub started: Vec<Generation>,
}

impl GenerationListing {
    /// The committed generations, oldest id first.
    pub fn committed_ids(&self) -> Vec<Generation> {
        self.committed.iter().map(|(g, _)| g.clone()).collect()
    }
}

/// Lists `<prefix>/<job>/gen/` with a `/` delimiter, all pages.
#[tracing::instrument(skip_all, fields(bucket = store.bucket(), prefix = store.generations_prefix()), err)]
pub async fn list_generation_level(store: &Store) -> Result<GenerationListing, S3Error> {
    let prefix = store.generations_prefix();
    let mut listing = GenerationListing::default();
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| store.error(Operation::ListObjectsV2, prefix, e))?;
        for object in page.contents() {
            let generation = object
                .key()
                .and_then(|k| k.strip_prefix(prefix))
                .and_then(|k| k.strip_suffix(MANIFEST_SUFFIX))
                .and_then(|name| Generation::parse(name).ok());
            if let Some(generation) = generation {
                let written = object.last_modified().map_or(0, |t| t.secs());
                listing.committed.push((generation, written));
            }
        }
        for common in page.common_prefixes() {
            let generation = common
                .prefix()
                .and_then(|p| p.strip_prefix(prefix))
                .and_then(|p| p.strip_suffix('/'))
                .and_then(|name| Generation::parse(name).ok());
            listing.started.extend(generation);
        }
    }
    listing.committed.sort();
    listing.started.sort();
    Ok(listing)
}

/// Committed generations of the job, oldest id first.
pub async fn list_generations(store: &Store) -> Result<Vec<Generation>, S3Error> {
    Ok(list_generation_level(store).await?.committed_ids())
}

/// The most recently started committed generation, if any (what an upload reuses files from).
pub async fn newest_generation(store: &Store) -> Result<Option<Generation>, S3Error> {
    Ok(list_generations(store).await?.pop())
}

/// Committed generations, oldest step first (see the module docs).
pub async fn committed_in_step_order(store: &Store) -> Result<Vec<Committed>, ListError> {
    let generations = list_generations(store).await.map_err(ListError::List)?;
    in_step_order(store, generations).await
}

/// `generations` (committed ones), oldest step first, their steps read from their manifests.
pub async fn in_step_order(
    store: &Store,
    generations: Vec<Generation>,
) -> Result<Vec<Committed>, ListError> {
    let mut committed: Vec<Committed> = futures::stream::iter(generations)
        .map(|generation| async move {
            let step =
                manifest_step(store, &generation)
                    .await
                    .map_err(|source| ListError::Step {
                        generation: generation.clone(),
                        source,
                    })?;
            Ok::<_, ListError>(Committed { generation, step })
        })
        .buffered(STEP_LOOKUPS)
        .try_collect()
        .await?;
    order_by_step(&mut committed);
    Ok(committed)
}

/// By step when every generation has one, time breaking ties; by time otherwise.
pub fn order_by_step(committed: &mut [Committed]) {
    if committed.iter().all(|c| c.step.is_some()) {
        committed.sort_by(|a, b| (a.step, &a.generation).cmp(&(b.step, &b.generation)));
    } else {
        committed.sort_by(|a, b| a.generation.cmp(&b.generation));
    }
}

/// The step a generation's manifest records: its metadata when the writer set it, its body
/// otherwise.
async fn manifest_step(
    store: &Store,
    generation: &Generation,
) -> Result<Option<u64>, ManifestReadError> {
    // A multi-pod generation is named by its step.
    if let Some(step) = generation.step() {
        return Ok(Some(step));
    }
    let key = store.manifest_key(generation);
    let head = with_retries(
        "reading a manifest's step",
        S3Error::is_retryable,
        |_| async {
            store
                .client()
                .head_object()
                .bucket(store.bucket())
                .key(&key)
                .send()
                .await
                .map_err(|e| store.error(Operation::HeadObject, &key, e))
        },
    )
    .await
    .map_err(ManifestReadError::Fetch)?;
    if let Some(step) = head
        .metadata()
        .and_then(|m| m.get(STEP_METADATA))
        .and_then(|v| v.parse().ok())
    {
        return Ok(Some(step));
    }
    // Written before the metadata was: the step from the body, read without keeping its files.
    let (head, ()) = fold_manifest(store, &key, generation, || (), |(), _| {}).await?;
    Ok(head.step)
}

/// Manifests read at once by [`describe_generations`]: small objects, latency-bound.
const DESCRIBE_FETCHES: usize = 8;

/// One generation of a job as `nerve-sidecar list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationInfo {
    pub generation: Generation,
    pub step: Option<u64>,
    /// Its manifest (a multi-pod job's: its job manifest) exists: restore may pick it.
    pub committed: bool,
    /// A multi-pod generation's parts: how many are committed, of how many ranks.
    pub parts: Option<(u32, u32)>,
    pub files: usize,
    pub bytes: u64,
    pub created_at: String,
}

/// Every generation of the job, committed ones and multi-pod ones with only some parts, oldest
/// step first.
pub async fn describe_generations(store: &Store) -> Result<Vec<GenerationInfo>, ListError> {
    let listing = list_generation_level(store)
        .await
        .map_err(ListError::List)?;
    let committed = listing.committed_ids();
    let mut started = listing.started;
    // Multi-pod generations some rank started but not every rank committed.
    started.retain(|g| g.step().is_some() && !committed.contains(g));
    let lookups = committed
        .into_iter()
        .map(|g| (g, true))
        .chain(started.into_iter().map(|g| (g, false)));
    let mut infos: Vec<GenerationInfo> = futures::stream::iter(lookups)
        .map(|(generation, committed)| describe(store, generation, committed))
        .buffered(DESCRIBE_FETCHES)
        .try_collect()
        .await?;
    let mut order: Vec<Committed> = infos
        .iter()
        .map(|i| Committed {
            generation: i.generation.clone(),
            step: i.step,
        })
        .collect();
    order_by_step(&mut order);
    let rank_of: std::collections::HashMap<Generation, usize> = order
        .into_iter()
        .enumerate()
        .map(|(at, c)| (c.generation, at))
        .collect();
    infos.sort_by_key(|i| rank_of.get(&i.generation).copied());
    Ok(infos)
}

/// A generation as `list` shows it. Its manifests are read entry by entry, counting files and
/// bytes, so memory does not grow with their size (up to [`DESCRIBE_FETCHES`] at once).
async fn describe(
    store: &Store,
    generation: Generation,
    committed: bool,
) -> Result<GenerationInfo, ListError> {
    let read_error = |source| ListError::Step {
        generation: generation.clone(),
        source,
    };
    if !committed {
        return describe_parts(store, generation).await;
    }
    let key = store.manifest_key(&generation);
    let (head, (files, bytes)) = fold_manifest(store, &key, &generation, Totals::default, add)
        .await
        .map_err(read_error)?;
    if head.kind.as_deref() != Some(JOB_MANIFEST_KIND) {
        return Ok(GenerationInfo {
            step: head.step,
            committed,
            parts: None,
            files,
            bytes,
            created_at: head.created_at,
            generation,
        });
    }
    // A job manifest: small, it sums up its parts.
    Ok(
        match fetch_generation(store, &generation)
            .await
            .map_err(read_error)?
        {
            GenerationManifest::Job(job) => GenerationInfo {
                step: Some(job.step),
                committed,
                parts: Some((job.world_size, job.world_size)),
                files: job.parts.iter().map(|p| p.files).sum(),
                bytes: job.parts.iter().map(|p| p.bytes).sum(),
                created_at: String::new(),
                generation,
            },
            GenerationManifest::Single(manifest) => GenerationInfo {
                step: manifest.step,
                committed,
                parts: None,
                files: manifest.files.len(),
                bytes: manifest.total_bytes(),
                created_at: manifest.created_at,
                generation,
            },
        },
    )
}

/// Files and bytes counted so far.
type Totals = (usize, u64);

fn add(totals: &mut Totals, file: crate::manifest::ManifestFile) {
    totals.0 += 1;
    totals.1 += file.size;
}

/// A multi-pod generation some rank started but not every rank committed: its committed parts.
async fn describe_parts(
    store: &Store,
    generation: Generation,
) -> Result<GenerationInfo, ListError> {
    let ranks = committed_ranks(store, &generation)
        .await
        .map_err(ListError::List)?;
    let mut info = GenerationInfo {
        step: generation.step(),
        committed: false,
        parts: None,
        files: 0,
        bytes: 0,
        created_at: String::new(),
        generation: generation.clone(),
    };
    let mut world_size = 0;
    for rank in &ranks {
        let key = store.part_manifest_key(&generation, *rank);
        let (head, (files, bytes)) = fold_manifest(store, &key, &generation, Totals::default, add)
            .await
            .map_err(|source| ListError::Step {
                generation: generation.clone(),
                source,
            })?;
        world_size = world_size.max(head.world_size.unwrap_or(0));
        info.files += files;
        info.bytes += bytes;
        info.created_at = info.created_at.max(head.created_at);
    }
    info.parts = Some((u32::try_from(ranks.len()).unwrap_or(u32::MAX), world_size));
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(id: &str, step: Option<u64>) -> Committed {
        Committed {
            generation: Generation::parse(id).expect("id"),
            step,
        }
    }

    #[test]
    fn orders_by_step_with_time_breaking_ties_and_by_time_when_a_step_is_missing() {
        // The second writer's clock is ahead: its older step has the later id.
        let early = "20261130T010000000Z-00000001";
        let late = "20261130T020000000Z-00000002";
        let later = "20261130T030000000Z-00000003";
        let mut all = vec![
            committed(early, Some(1055)),
            committed(late, Some(55)),
            committed(later, Some(1055)),
        ];
        order_by_step(&mut all);
        let ids: Vec<&str> = all.iter().map(|c| c.generation.as_str()).collect();
        assert_eq!(ids, [late, early, later]);
        let mut some = vec![committed(late, None), committed(early, Some(1055))];
        order_by_step(&mut some);
        assert_eq!(some[1].generation.as_str(), late);
    }
}
