//! Listing a job's committed generations (those whose manifest exists), oldest first.

use futures::{StreamExt, TryStreamExt};

use crate::cli::ListArgs;
use crate::generation::Generation;
use crate::manifest::{MANIFEST_SUFFIX, Manifest, fetch_manifest};
use crate::progress::format_bytes;
use crate::store::{Operation, S3Error, Store};

/// Manifests fetched at once for `nerve-sidecar list`: small objects, latency-bound.
const MANIFEST_FETCHES: usize = 8;

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

/// `nerve-sidecar list`: one line (or JSON object) per committed generation.
pub async fn command(args: ListArgs) -> anyhow::Result<()> {
    let store = Store::connect(&args.store).await;
    let generations = list_generations(&store).await?;
    if generations.is_empty() {
        eprintln!(
            "no committed generations for job {} under {}",
            args.store.job, args.store.dest
        );
        return Ok(());
    }
    let manifests: Vec<(Generation, Manifest)> = futures::stream::iter(generations)
        .map(|generation| {
            let store = &store;
            async move {
                let manifest = fetch_manifest(store, &generation).await?;
                anyhow::Ok((generation, manifest))
            }
        })
        .buffered(MANIFEST_FETCHES)
        .try_collect()
        .await?;
    if !args.json {
        println!(
            "{:<30} {:>7} {:>11} {:>10}  created",
            "generation", "files", "size", "step"
        );
    }
    for (generation, manifest) in manifests {
        if args.json {
            let line = serde_json::json!({
                "generation": generation.as_str(),
                "files": manifest.files.len(),
                "bytes": manifest.total_bytes(),
                "step": manifest.step,
                "created_at": manifest.created_at,
                "manifest": store.manifest_key(&generation),
            });
            println!("{line}");
        } else {
            let step = manifest
                .step
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<30} {:>7} {:>11} {:>10}  {}",
                generation.as_str(),
                manifest.files.len(),
                format_bytes(manifest.total_bytes()),
                step,
                manifest.created_at
            );
        }
    }
    Ok(())
}
