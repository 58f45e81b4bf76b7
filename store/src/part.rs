//! Multi-pod generations: every rank's shard in one consistent generation.
//!
//! In a job of `world_size` pods each rank uploads only its own node's files, as a *part* of the
//! generation named by the checkpoint's step (every rank reads the same step from its own
//! checkpoint, so they agree on the id without talking to each other):
//!
//! ```text
//! <prefix>/<job>/gen/<G>/rank-<r>/<path>           rank r's files (new or changed ones)
//! <prefix>/<job>/gen/<G>/rank-<r>.manifest.json    rank r's part, committed
//! <prefix>/<job>/gen/<G>.manifest.json             the generation, committed: names every part
//! ```
//!
//! The job manifest is written by whichever rank first sees all `world_size` parts committed,
//! with a conditional write (`If-None-Match: *`). Its bytes follow from the parts alone, so where
//! a store ignores the condition two ranks writing it write the same object. On a strongly
//! consistent store (S3 since 2020) the last rank to commit its part always sees every part: a
//! rank lists after its own commit, so of two ranks committing at once, the later lister sees
//! the other. Readers count a generation only once its job manifest exists.

use std::collections::{BTreeMap, HashMap};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::generation::Generation;
use crate::manifest::{
    MANIFEST_SUFFIX, Manifest, ManifestError, ManifestFile, ManifestReadError, Written, fetch_body,
    fetch_manifest_at, put_json,
};
use crate::s3::{Operation, S3Error, Store, with_retries};

/// `kind` of a job manifest.
pub const JOB_MANIFEST_KIND: &str = "job";
/// Format version of job manifests written by this build.
pub const JOB_MANIFEST_VERSION: u32 = 1;
/// Largest world size accepted: far beyond any job, small enough that a listing of parts stays
/// one page.
pub const MAX_WORLD_SIZE: u32 = 1000;
/// Earlier generations looked at for this rank's previous part (what unchanged files are reused
/// from): the last few checkpoints are where frozen weights were uploaded.
const PREVIOUS_PART_LOOKBACK: usize = 4;

/// A pod's place in a multi-pod job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rank {
    pub rank: u32,
    pub world_size: u32,
}

impl Rank {
    /// Checks `rank < world_size <= MAX_WORLD_SIZE`.
    pub fn new(rank: u32, world_size: u32) -> Result<Rank, String> {
        if world_size == 0 || world_size > MAX_WORLD_SIZE {
            return Err(format!(
                "world size {world_size} is not between 1 and {MAX_WORLD_SIZE}"
            ));
        }
        if rank >= world_size {
            return Err(format!(
                "rank {rank} is not below the world size {world_size} (ranks count from 0)"
            ));
        }
        Ok(Rank { rank, world_size })
    }

    /// More than one pod: the generation is committed in parts.
    pub fn is_multi_pod(&self) -> bool {
        self.world_size > 1
    }
}

/// One part as the job manifest names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartEntry {
    pub rank: u32,
    /// Key of the part's manifest.
    pub manifest: String,
    pub files: usize,
    pub bytes: u64,
}

/// The commit of a multi-pod generation. Deterministic: any rank that writes it writes the
/// same bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobManifest {
    pub version: u32,
    pub kind: String,
    pub generation: String,
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub parts: Vec<PartEntry>,
}

impl JobManifest {
    /// Checks what restore relies on: this generation, one part per rank, each part's manifest
    /// where this job keeps it.
    pub fn validate(&self, generation: &Generation, store: &Store) -> Result<(), ManifestError> {
        if self.version > JOB_MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(self.version));
        }
        if self.generation != generation.as_str() {
            return Err(ManifestError::WrongGeneration {
                expected: generation.to_string(),
                found: self.generation.clone(),
            });
        }
        let ranks: Vec<u32> = self.parts.iter().map(|p| p.rank).collect();
        let expected: Vec<u32> = (0..self.world_size).collect();
        if ranks != expected || self.world_size > MAX_WORLD_SIZE {
            return Err(ManifestError::Parts {
                world_size: self.world_size,
                ranks,
            });
        }
        for part in &self.parts {
            let wanted = store.part_manifest_key(generation, part.rank);
            if part.manifest != wanted {
                return Err(ManifestError::ForeignKey {
                    path: format!("part of rank {}", part.rank),
                    key: part.manifest.clone(),
                    prefix: wanted,
                });
            }
        }
        Ok(())
    }
}

/// A committed generation's manifest: one pod's, or a multi-pod job's.
#[derive(Debug, Clone)]
pub enum GenerationManifest {
    Single(Manifest),
    Job(JobManifest),
}

/// Reads the commit record of `generation`, whichever kind it is.
pub async fn fetch_generation(
    store: &Store,
    generation: &Generation,
) -> Result<GenerationManifest, ManifestReadError> {
    let key = store.manifest_key(generation);
    let body = with_retries(
        "fetching the manifest",
        ManifestReadError::is_retryable,
        |_| fetch_body(store, &key),
    )
    .await?;
    let parse_error = |source| ManifestReadError::Parse {
        bucket: store.bucket().to_owned(),
        key: key.clone(),
        source,
    };
    // Only the `kind` field: a manifest of 100,000 files as a `serde_json::Value` takes several
    // times its own size, and its body is parsed once more below anyway.
    let kind: ManifestKind = serde_json::from_slice(&body).map_err(parse_error)?;
    if kind.kind.as_deref() == Some(JOB_MANIFEST_KIND) {
        let job: JobManifest = serde_json::from_slice(&body).map_err(parse_error)?;
        job.validate(generation, store)
            .map_err(|source| ManifestReadError::Invalid {
                bucket: store.bucket().to_owned(),
                key: key.clone(),
                source,
            })?;
        return Ok(GenerationManifest::Job(job));
    }
    // A single pod's manifest, validated as `fetch_manifest` does.
    crate::manifest::parse_manifest(store, &key, generation, &body).map(GenerationManifest::Single)
}

/// The one field that tells a job manifest from a single pod's.
#[derive(serde::Deserialize)]
struct ManifestKind {
    #[serde(default)]
    kind: Option<String>,
}

/// The parts of `job`, each fetched and validated, in rank order.
pub async fn fetch_parts(
    store: &Store,
    generation: &Generation,
    job: &JobManifest,
) -> Result<Vec<Manifest>, ManifestReadError> {
    let mut parts = Vec::with_capacity(job.parts.len());
    for part in &job.parts {
        parts.push(fetch_manifest_at(store, &part.manifest, generation).await?);
    }
    Ok(parts)
}

/// The ranks whose parts of `generation` are committed (their part manifests exist).
pub async fn committed_ranks(store: &Store, generation: &Generation) -> Result<Vec<u32>, S3Error> {
    let prefix = store.objects_prefix(generation);
    let mut ranks = Vec::new();
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(&prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| store.error(Operation::ListObjectsV2, &prefix, e))?;
        for object in page.contents() {
            let rank = object
                .key()
                .and_then(|k| k.strip_prefix(&prefix))
                .and_then(|k| k.strip_suffix(MANIFEST_SUFFIX))
                .and_then(|k| k.strip_prefix("rank-"))
                .and_then(|r| r.parse::<u32>().ok());
            ranks.extend(rank);
        }
    }
    ranks.sort_unstable();
    Ok(ranks)
}

/// What committing the job manifest came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobCommit {
    /// This rank wrote the job manifest: the generation is committed.
    Written,
    /// Another rank had written it already: committed.
    AlreadyCommitted,
    /// Parts still missing: the last rank to commit its part writes it.
    Waiting { committed: u32, world_size: u32 },
}

impl JobCommit {
    /// For logs and metrics: `written`, `already-committed` or `waiting`.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobCommit::Written => "written",
            JobCommit::AlreadyCommitted => "already-committed",
            JobCommit::Waiting { .. } => "waiting",
        }
    }

    /// Parts committed so far, when some are still missing.
    pub fn parts_committed(&self) -> Option<u32> {
        match self {
            JobCommit::Waiting { committed, .. } => Some(*committed),
            JobCommit::Written | JobCommit::AlreadyCommitted => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error("listing the committed parts of generation {generation}")]
    List {
        generation: Generation,
        #[source]
        source: S3Error,
    },
    #[error("reading the parts of generation {generation}")]
    Read {
        generation: Generation,
        #[source]
        source: Box<ManifestReadError>,
    },
    #[error(
        "the parts of generation {generation} disagree about the job: rank {rank} says world \
         size {theirs}, this rank {ours}; every pod of the job needs the same --world-size"
    )]
    WorldSize {
        generation: Generation,
        rank: u32,
        theirs: u32,
        ours: u32,
    },
    #[error("writing the job manifest of generation {generation}")]
    Write {
        generation: Generation,
        #[source]
        source: S3Error,
    },
}

impl PartError {
    pub fn is_retryable(&self) -> bool {
        match self {
            PartError::List { source, .. } | PartError::Write { source, .. } => {
                source.is_retryable()
            }
            PartError::Read { source, .. } => source.is_retryable(),
            PartError::WorldSize { .. } => false,
        }
    }
}

/// Writes the job manifest of `generation` if every one of `world_size` parts is committed.
pub async fn commit_job(
    store: &Store,
    generation: &Generation,
    step: u64,
    world_size: u32,
) -> Result<JobCommit, PartError> {
    let ranks = committed_ranks(store, generation)
        .await
        .map_err(|source| PartError::List {
            generation: generation.clone(),
            source,
        })?;
    let committed = u32::try_from(ranks.len()).unwrap_or(u32::MAX);
    if ranks != (0..world_size).collect::<Vec<_>>() {
        return Ok(JobCommit::Waiting {
            committed,
            world_size,
        });
    }
    let mut parts = Vec::with_capacity(ranks.len());
    for rank in ranks {
        let key = store.part_manifest_key(generation, rank);
        let part = fetch_manifest_at(store, &key, generation)
            .await
            .map_err(|source| PartError::Read {
                generation: generation.clone(),
                source: Box::new(source),
            })?;
        if let Some(theirs) = part.world_size.filter(|&w| w != world_size) {
            return Err(PartError::WorldSize {
                generation: generation.clone(),
                rank,
                theirs,
                ours: world_size,
            });
        }
        parts.push(PartEntry {
            rank,
            manifest: key,
            files: part.files.len(),
            bytes: part.total_bytes(),
        });
    }
    let job = JobManifest {
        version: JOB_MANIFEST_VERSION,
        kind: JOB_MANIFEST_KIND.to_owned(),
        generation: generation.to_string(),
        job: store.job().to_owned(),
        step,
        world_size,
        parts,
    };
    let body = serde_json::to_vec_pretty(&job).unwrap_or_default();
    let written = put_json(
        store,
        &store.manifest_key(generation),
        body,
        Some(step),
        true,
    )
    .await
    .map_err(|source| PartError::Write {
        generation: generation.clone(),
        source,
    })?;
    Ok(match written {
        Written::Written => JobCommit::Written,
        Written::AlreadyThere => JobCommit::AlreadyCommitted,
    })
}

/// This rank's part in the newest of the last few generations before `before` that holds one
/// (committed or not): what its unchanged files are reused from. Objects it names stay in the
/// store as long as a kept generation references them (prune counts every kept part).
pub async fn previous_part(
    store: &Store,
    rank: u32,
    before: &Generation,
) -> Result<Option<Manifest>, ManifestReadError> {
    let listing = crate::list::list_generation_level(store)
        .await
        .map_err(ManifestReadError::Fetch)?;
    let mut candidates: Vec<Generation> = listing
        .started
        .into_iter()
        .filter(|g| g < before && g.step().is_some())
        .collect();
    candidates.sort();
    for generation in candidates.iter().rev().take(PREVIOUS_PART_LOOKBACK) {
        let key = store.part_manifest_key(generation, rank);
        match fetch_manifest_at(store, &key, generation).await {
            Ok(part) => return Ok(Some(part)),
            Err(ManifestReadError::Fetch(e)) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Which parts a restore brings into `--dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartsChoice {
    /// Every rank's files: what torch.distributed.checkpoint needs to reshard, and what a
    /// node-local disk needs when ranks move between nodes.
    #[default]
    All,
    /// This rank's own part, plus the files of other parts that belong to no rank in
    /// particular ([`is_rank_specific`]).
    Own(u32),
}

/// File names that mark a file as one process rank's shard: torch.distributed.checkpoint's
/// `__<rank>_<n>.distcp`, DeepSpeed's `zero_pp_rank_<rank>_...`, the Hugging Face Trainer's
/// `rng_state_<rank>.pth`, and a `rank-<r>/` or `rank<r>` path segment. Everything else
/// (`.metadata`, `trainer_state.json`, configs, tokenizers, DeepSpeed's model states and
/// `latest`) is what every rank loads.
const RANK_SPECIFIC: &str =
    r"(?:__\d+_\d+\.distcp$|zero_pp_rank_\d+_|rng_state_\d+\.pth$|(?:^|/)rank-?\d+(?:/|[._-]))";

/// Whether `path` is one rank's shard rather than a file every rank needs.
pub fn is_rank_specific(path: &str) -> bool {
    // A constant pattern, exercised by the tests below.
    Regex::new(RANK_SPECIFIC).is_ok_and(|pattern| pattern.is_match(path))
}

/// Two parts name one path with different contents.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "ranks {first} and {second} both hold `{path}` with different contents; restore cannot \
     pick one (choose with --prefer-rank, or fix the trainer so only one rank writes it)"
)]
pub struct PartsDisagree {
    pub path: String,
    pub first: u32,
    pub second: u32,
}

/// The files a restore brings: the parts' files merged by path. The same path with the same
/// contents in several parts is one file; different contents are an error naming both ranks,
/// unless `prefer` names the rank that wins.
pub fn merge_parts(
    parts: &[Manifest],
    choice: PartsChoice,
    prefer: Option<u32>,
) -> Result<Vec<ManifestFile>, PartsDisagree> {
    let mut merged: BTreeMap<&str, (u32, &ManifestFile)> = BTreeMap::new();
    let identity = |f: &ManifestFile| {
        (
            f.size,
            f.crc32c.clone(),
            f.crc64nvme.clone(),
            f.link.clone(),
        )
    };
    for part in parts {
        let rank = part.rank.unwrap_or(0);
        for file in &part.files {
            if let PartsChoice::Own(own) = choice
                && rank != own
                && is_rank_specific(&file.path)
            {
                continue;
            }
            match merged.get(file.path.as_str()) {
                None => {
                    merged.insert(&file.path, (rank, file));
                }
                Some((_, held)) if identity(held) == identity(file) => {}
                Some((held_rank, _)) if prefer == Some(*held_rank) => {}
                Some(_) if prefer == Some(rank) => {
                    merged.insert(&file.path, (rank, file));
                }
                Some((held_rank, _)) => {
                    return Err(PartsDisagree {
                        path: file.path.clone(),
                        first: *held_rank,
                        second: rank,
                    });
                }
            }
        }
    }
    Ok(merged.into_values().map(|(_, f)| f.clone()).collect())
}

/// Parts committed, by generation, for the generations `keys` (a listing of the job) holds.
pub fn parts_by_generation<'a>(
    store: &Store,
    keys: impl IntoIterator<Item = &'a str>,
) -> HashMap<Generation, Vec<u32>> {
    let prefix = store.generations_prefix();
    let mut found: HashMap<Generation, Vec<u32>> = HashMap::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let Some((generation, file)) = rest.split_once('/') else {
            continue;
        };
        let rank = file
            .strip_suffix(MANIFEST_SUFFIX)
            .and_then(|f| f.strip_prefix("rank-"))
            .and_then(|r| r.parse().ok());
        if let (Ok(generation), Some(rank)) = (Generation::parse(generation), rank) {
            found.entry(generation).or_default().push(rank);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, crc: &str) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            size: 1,
            mode: 0o644,
            crc32c: crc.into(),
            crc64nvme: Some("0000000000000000".into()),
            key: format!("p/j/gen/step-000000000001/x/{path}"),
            link: None,
        }
    }

    fn part(rank: u32, files: Vec<ManifestFile>) -> Manifest {
        Manifest {
            version: 1,
            generation: "step-000000000001".into(),
            job: "j".into(),
            created_at: String::new(),
            node: None,
            pod: None,
            step: Some(1),
            notice: None,
            rank: Some(rank),
            world_size: Some(2),
            files,
        }
    }

    #[test]
    fn ranks_are_checked_against_the_world_size() {
        assert!(Rank::new(0, 1).is_ok_and(|r| !r.is_multi_pod()));
        assert!(Rank::new(2, 3).is_ok_and(|r| r.is_multi_pod()));
        assert!(Rank::new(3, 3).unwrap_err().contains("not below"));
        assert!(Rank::new(0, 0).is_err());
    }

    #[test]
    fn parts_merge_by_path_and_shared_identical_files_count_once() {
        let parts = [
            part(
                0,
                vec![
                    file("config.json", "00000001"),
                    file("rank-0/w", "0000000a"),
                ],
            ),
            part(
                1,
                vec![
                    file("config.json", "00000001"),
                    file("rank-1/w", "0000000b"),
                ],
            ),
        ];
        let merged = merge_parts(&parts, PartsChoice::All, None).unwrap();
        let paths: Vec<&str> = merged.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["config.json", "rank-0/w", "rank-1/w"]);
    }

    #[test]
    fn two_ranks_disagreeing_about_a_path_is_an_error_unless_one_is_preferred() {
        let parts = [
            part(0, vec![file("config.json", "00000001")]),
            part(1, vec![file("config.json", "00000002")]),
        ];
        let err = merge_parts(&parts, PartsChoice::All, None).unwrap_err();
        assert_eq!((err.first, err.second), (0, 1));
        assert!(err.to_string().contains("config.json"));
        let merged = merge_parts(&parts, PartsChoice::All, Some(1)).unwrap();
        assert_eq!(merged[0].crc32c, "00000002");
        let merged = merge_parts(&parts, PartsChoice::All, Some(0)).unwrap();
        assert_eq!(merged[0].crc32c, "00000001");
    }

    #[test]
    fn own_parts_bring_this_ranks_shards_and_what_every_rank_needs() {
        let parts = [
            part(
                0,
                vec![
                    file(".metadata", "00000001"),
                    file("__0_0.distcp", "0000000a"),
                ],
            ),
            part(
                1,
                vec![
                    file("__1_0.distcp", "0000000b"),
                    file("rng_state_1.pth", "0000000c"),
                ],
            ),
        ];
        let merged = merge_parts(&parts, PartsChoice::Own(1), None).unwrap();
        let paths: Vec<&str> = merged.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, [".metadata", "__1_0.distcp", "rng_state_1.pth"]);
    }

    #[test]
    fn recognises_the_shards_of_the_common_layouts() {
        for shard in [
            "__3_0.distcp",
            "global_step9/zero_pp_rank_3_mp_rank_00_optim_states.pt",
            "checkpoint-9/rng_state_3.pth",
            "checkpoint-9/rank-3/optimizer.pt",
            "rank3.pt",
        ] {
            assert!(is_rank_specific(shard), "{shard}");
        }
        for shared in [
            ".metadata",
            "checkpoint-9/trainer_state.json",
            "global_step9/mp_rank_00_model_states.pt",
            "latest",
            "tokenizer.json",
            "checkpoint-9/rng_state.pth",
        ] {
            assert!(!is_rank_specific(shared), "{shared}");
        }
    }
}
