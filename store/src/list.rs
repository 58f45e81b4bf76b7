//! Listing a job's committed generations (those whose manifest exists), oldest first.

use crate::generation::Generation;
use crate::manifest::MANIFEST_SUFFIX;
use crate::s3::{Operation, S3Error, Store};

/// Committed generations of the job, oldest first.
///
/// Lists one level under `<prefix>/<job>/gen/` with a `/` delimiter, so the cost is one entry
/// per generation, not one per file.
#[tracing::instrument(skip_all, fields(bucket = store.bucket(), prefix = store.generations_prefix()), err)]
pub async fn list_generations(store: &Store) -> Result<Vec<Generation>, S3Error> {
    let prefix = store.generations_prefix();
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    let mut generations = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| store.error(Operation::ListObjectsV2, prefix, e))?;
        for object in page.contents() {
            let Some(name) = object
                .key()
                .and_then(|k| k.strip_prefix(prefix))
                .and_then(|k| k.strip_suffix(MANIFEST_SUFFIX))
            else {
                continue;
            };
            if let Ok(generation) = Generation::parse(name) {
                generations.push(generation);
            }
        }
    }
    generations.sort();
    Ok(generations)
}

/// The newest committed generation, if any.
pub async fn newest_generation(store: &Store) -> Result<Option<Generation>, S3Error> {
    Ok(list_generations(store).await?.pop())
}
