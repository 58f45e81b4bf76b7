//! The manifest: the commit record of a generation, written last.
//!
//! It lists every file of the checkpoint with its relative path, size, mode, checksums (CRC32C
//! and CRC-64/NVME) and the key holding its bytes (which may belong to an earlier generation
//! when the file did not change), and every symbolic link with its target inside the
//! directory. Readers never trust it blindly: [`Manifest::validate`] refuses paths that would
//! land outside the checkpoint directory, Nerve's reserved names, duplicate paths, keys outside
//! the job's prefix, links that point outside, and files reached through a link.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::checksum::Checksums;
use crate::generation::Generation;
use crate::s3::ChecksumMode;
use crate::s3::{Operation, S3Error, Store, with_retries};

/// `<generation>.manifest.json` beside the generation's object folder.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Format version of a manifest without links: what every earlier build reads (they ignore the
/// fields they do not know, such as `crc64nvme`), so a rolling upgrade keeps restoring.
pub const MANIFEST_VERSION: u32 = 1;
/// Format version of a manifest that holds symbolic links, which earlier builds cannot restore
/// (they refuse it and say to upgrade, rather than restore it without its links).
pub const MANIFEST_VERSION_LINKS: u32 = 2;
/// User metadata on a manifest object holding its step (`x-amz-meta-nerve-step`), so a listing
/// can order generations by step with a HEAD per generation instead of reading every manifest.
pub const STEP_METADATA: &str = "nerve-step";
/// A manifest bigger than this is not one of ours (a million files is ~200 MiB of JSON).
pub const MAX_MANIFEST_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub generation: String,
    pub job: String,
    /// RFC 3339 time the upload started.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// The notice that triggered this checkpoint, as the agent sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<serde_json::Value>,
    /// In a multi-pod job: the rank whose part this manifest commits, and how many ranks the job
    /// has ([`crate::part`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFile {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// CRC32C of the whole file, 8 lowercase hex digits.
    pub crc32c: String,
    /// CRC-64/NVME of the whole file, 16 lowercase hex digits (absent in manifests written
    /// before it was recorded; such files are never reused by a later upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64nvme: Option<String>,
    /// Full object key holding the bytes (empty for a link).
    pub key: String,
    /// For a symbolic link: its target, relative to the link's directory and inside the
    /// checkpoint directory. A link has no bytes of its own (size 0, no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl ManifestFile {
    /// Both checksums, when the manifest records both.
    pub fn checksums(&self) -> Option<Checksums> {
        Some(Checksums {
            crc32c: parse_crc32c(&self.crc32c)?,
            crc64nvme: parse_crc64(self.crc64nvme.as_deref()?)?,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error(
        "manifest version {0} is newer than this sidecar understands (up to {MANIFEST_VERSION}); upgrade nerve-sidecar"
    )]
    UnsupportedVersion(u32),
    #[error("manifest says it is generation {found}, but it was stored as {expected}")]
    WrongGeneration { expected: String, found: String },
    #[error("manifest path `{path}` {reason}; refusing to restore it")]
    UnsafePath { path: String, reason: &'static str },
    #[error("manifest lists `{0}` twice")]
    DuplicatePath(String),
    #[error("manifest key `{key}` for `{path}` is outside this job's prefix `{prefix}`")]
    ForeignKey {
        path: String,
        key: String,
        prefix: String,
    },
    #[error("manifest checksum `{crc}` for `{path}` is not 8 (CRC32C) or 16 (CRC-64) hex digits")]
    BadChecksum { path: String, crc: String },
    #[error(
        "manifest link `{path}` points to `{target}`, outside the checkpoint directory; refusing to restore it"
    )]
    UnsafeLink { path: String, target: String },
    #[error("job manifest names parts of ranks {ranks:?}, not one for each of {world_size} ranks")]
    Parts { world_size: u32, ranks: Vec<u32> },
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Checks everything restore relies on before it touches the disk.
    pub fn validate(
        &self,
        generation: &Generation,
        generations_prefix: &str,
    ) -> Result<(), ManifestError> {
        if self.version > MANIFEST_VERSION_LINKS {
            return Err(ManifestError::UnsupportedVersion(self.version));
        }
        if self.generation != generation.as_str() {
            return Err(ManifestError::WrongGeneration {
                expected: generation.to_string(),
                found: self.generation.clone(),
            });
        }
        let mut seen = HashSet::with_capacity(self.files.len());
        let mut dirs = HashSet::new();
        let mut links = HashSet::new();
        for file in &self.files {
            check_relative_path(&file.path)?;
            if crate::exclude::is_reserved(&file.path) {
                return Err(ManifestError::UnsafePath {
                    path: file.path.clone(),
                    reason: "uses a name Nerve reserves for restore's own files",
                });
            }
            if !seen.insert(file.path.as_str()) {
                return Err(ManifestError::DuplicatePath(file.path.clone()));
            }
            let mut parent = file.path.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                dirs.insert(dir);
                parent = dir;
            }
            if let Some(target) = &file.link {
                let link_dir = file.path.rsplit_once('/').map_or("", |(dir, _)| dir);
                if resolve_link(link_dir, target).is_none() {
                    return Err(ManifestError::UnsafeLink {
                        path: file.path.clone(),
                        target: target.clone(),
                    });
                }
                links.insert(file.path.as_str());
                continue;
            }
            if !key_inside(&file.key, generations_prefix) {
                return Err(ManifestError::ForeignKey {
                    path: file.path.clone(),
                    key: file.key.clone(),
                    prefix: generations_prefix.to_owned(),
                });
            }
            if parse_crc32c(&file.crc32c).is_none() {
                return Err(ManifestError::BadChecksum {
                    path: file.path.clone(),
                    crc: file.crc32c.clone(),
                });
            }
            if let Some(crc) = &file.crc64nvme
                && parse_crc64(crc).is_none()
            {
                return Err(ManifestError::BadChecksum {
                    path: file.path.clone(),
                    crc: crc.clone(),
                });
            }
        }
        // Restore writes files by path: one below a link would be written wherever it points.
        if let Some(through) = self.files.iter().find(|f| {
            let mut parent = f.path.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                if links.contains(dir) {
                    return true;
                }
                parent = dir;
            }
            false
        }) {
            return Err(ManifestError::UnsafePath {
                path: through.path.clone(),
                reason: "lies below a symbolic link",
            });
        }
        // A file that is also a directory of another file: restore could not build both.
        if let Some(clash) = self.files.iter().find(|f| dirs.contains(f.path.as_str())) {
            return Err(ManifestError::UnsafePath {
                path: clash.path.clone(),
                reason: "is both a file and a directory",
            });
        }
        Ok(())
    }
}

/// Whether `key` names an object under `generations_prefix` (the job's), without `..`.
pub fn key_inside(key: &str, generations_prefix: &str) -> bool {
    key.strip_prefix(generations_prefix)
        .is_some_and(|rest| !rest.is_empty() && !rest.split('/').any(|s| s == ".."))
}

/// Where a link in `link_dir` (relative to the checkpoint directory) with `target` points,
/// relative to the checkpoint directory; `None` when it leaves it (or is absolute). Judged on
/// the path alone, never by following links.
pub fn resolve_link(link_dir: &str, target: &str) -> Option<String> {
    if target.starts_with('/') || target.is_empty() || target.contains('\0') {
        return None;
    }
    let mut resolved: Vec<&str> = link_dir.split('/').filter(|s| !s.is_empty()).collect();
    for segment in target.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                resolved.pop()?;
            }
            name => resolved.push(name),
        }
    }
    Some(resolved.join("/"))
}

/// Refuses anything but a plain relative `/`-separated path of normal components.
pub fn check_relative_path(path: &str) -> Result<(), ManifestError> {
    let reason = if path.is_empty() {
        Some("is empty")
    } else if path.starts_with('/') || path.starts_with('\\') {
        Some("is absolute")
    } else if path.contains('\\') {
        Some("contains a backslash")
    } else if path.contains('\0') {
        Some("contains a NUL byte")
    } else if path.split('/').any(|s| s == "..") {
        Some("climbs out with `..`")
    } else if path.split('/').any(|s| s.is_empty() || s == ".") {
        Some("has an empty or `.` segment")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ManifestError::UnsafePath {
            path: path.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Why a stored manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestReadError {
    #[error("fetching the manifest")]
    Fetch(#[source] S3Error),
    #[error("reading the manifest body of s3://{bucket}/{key}")]
    Body {
        bucket: String,
        key: String,
        #[source]
        source: aws_sdk_s3::primitives::ByteStreamError,
    },
    #[error("reading the manifest body of s3://{bucket}/{key}")]
    Stream {
        bucket: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "manifest s3://{bucket}/{key} is larger than {MAX_MANIFEST_BYTES} bytes; not a Nerve manifest"
    )]
    TooLarge { bucket: String, key: String },
    #[error("manifest s3://{bucket}/{key} is not valid manifest JSON")]
    Parse {
        bucket: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest s3://{bucket}/{key} is unsafe")]
    Invalid {
        bucket: String,
        key: String,
        #[source]
        source: ManifestError,
    },
}

impl ManifestReadError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ManifestReadError::Fetch(e) => e.is_retryable(),
            ManifestReadError::Body { .. } | ManifestReadError::Stream { .. } => true,
            _ => false,
        }
    }
}

/// Downloads, parses and validates the manifest of single-pod `generation`.
pub async fn fetch_manifest(
    store: &Store,
    generation: &Generation,
) -> Result<Manifest, ManifestReadError> {
    fetch_manifest_at(store, &store.manifest_key(generation), generation).await
}

/// Downloads, parses and validates the manifest stored at `key` for `generation` (a
/// single-pod generation's, or one rank's part of a multi-pod one).
pub async fn fetch_manifest_at(
    store: &Store,
    key: &str,
    generation: &Generation,
) -> Result<Manifest, ManifestReadError> {
    let body = with_retries(
        "fetching the manifest",
        ManifestReadError::is_retryable,
        |_| fetch_body(store, key),
    )
    .await?;
    parse_manifest(store, key, generation, &body)
}

/// Parses and validates `body`, the manifest stored at `key` for `generation`.
pub fn parse_manifest(
    store: &Store,
    key: &str,
    generation: &Generation,
    body: &[u8],
) -> Result<Manifest, ManifestReadError> {
    let bucket = store.bucket();
    let manifest: Manifest =
        serde_json::from_slice(body).map_err(|source| ManifestReadError::Parse {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    manifest
        .validate(generation, store.generations_prefix())
        .map_err(|source| ManifestReadError::Invalid {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    Ok(manifest)
}

/// The body of the manifest object at `key`, refused beyond [`MAX_MANIFEST_BYTES`]. Gathered
/// into one buffer of the announced length as it arrives, rather than collected in pieces and
/// then copied into one, which held the body twice.
pub async fn fetch_body(store: &Store, key: &str) -> Result<bytes::Bytes, ManifestReadError> {
    let response = get_manifest(store, key).await?;
    let length = response
        .content_length()
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(0);
    let mut body = response.body;
    let mut bytes = bytes::BytesMut::with_capacity(length);
    loop {
        match body.try_next().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) => return Ok(bytes.freeze()),
            Err(source) => {
                return Err(ManifestReadError::Body {
                    bucket: store.bucket().to_owned(),
                    key: key.to_owned(),
                    source,
                });
            }
        }
    }
}

/// The GET of the manifest object at `key`, refused beyond [`MAX_MANIFEST_BYTES`].
async fn get_manifest(
    store: &Store,
    key: &str,
) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, ManifestReadError> {
    let bucket = store.bucket();
    let response = store
        .client()
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| ManifestReadError::Fetch(store.error(Operation::GetObject, key, e)))?;
    let length = response
        .content_length()
        .and_then(|l| u64::try_from(l).ok());
    if length.is_some_and(|l| l > MAX_MANIFEST_BYTES) {
        return Err(ManifestReadError::TooLarge {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        });
    }
    Ok(response)
}

/// The top-level fields of a manifest (a single pod's, a rank's part, or a job manifest), read
/// without its file list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ManifestHead {
    pub version: u32,
    /// `job` for a multi-pod job manifest, absent otherwise.
    pub kind: Option<String>,
    pub generation: String,
    pub created_at: String,
    pub step: Option<u64>,
    pub world_size: Option<u32>,
}

/// Reads the manifest at `key` of `generation` as its body arrives, handing every file entry
/// to `each` along with an accumulator `init` makes (afresh for each attempt), and keeps no
/// list of them: memory is one entry's, not the manifest's (a manifest of 100,000 files is
/// ~25 MiB of JSON and more parsed), for readers that count files or collect keys (`list`,
/// `prune`, an upload's reuse check). Checks the version and generation, not the paths: it is
/// not for restoring.
pub async fn fold_manifest<A, I, F>(
    store: &Store,
    key: &str,
    generation: &Generation,
    init: I,
    each: F,
) -> Result<(ManifestHead, A), ManifestReadError>
where
    A: Send + 'static,
    I: Fn() -> A,
    F: Fn(&mut A, ManifestFile) + Copy + Send + 'static,
{
    let (head, acc) = with_retries(
        "reading a manifest",
        ManifestReadError::is_retryable,
        |_| fold_once(store, key, init(), each),
    )
    .await?;
    let invalid = |source| ManifestReadError::Invalid {
        bucket: store.bucket().to_owned(),
        key: key.to_owned(),
        source,
    };
    if head.kind.is_none() && head.version > MANIFEST_VERSION_LINKS {
        return Err(invalid(ManifestError::UnsupportedVersion(head.version)));
    }
    if head.generation != generation.as_str() {
        return Err(invalid(ManifestError::WrongGeneration {
            expected: generation.to_string(),
            found: head.generation,
        }));
    }
    Ok((head, acc))
}

/// One attempt of [`fold_manifest`]: the body parsed on a blocking thread as it streams in.
async fn fold_once<A, F>(
    store: &Store,
    key: &str,
    mut acc: A,
    each: F,
) -> Result<(ManifestHead, A), ManifestReadError>
where
    A: Send + 'static,
    F: Fn(&mut A, ManifestFile) + Copy + Send + 'static,
{
    let body = get_manifest(store, key).await?.body.into_async_read();
    let reader = std::io::BufReader::new(tokio_util::io::SyncIoBridge::new(body));
    let parsed = tokio::task::spawn_blocking(move || {
        let mut de = serde_json::Deserializer::from_reader(reader);
        let head = serde::de::DeserializeSeed::deserialize(
            Fold {
                acc: &mut acc,
                each,
            },
            &mut de,
        )?;
        de.end()?;
        Ok::<_, serde_json::Error>((head, acc))
    })
    .await
    .map_err(|e| serde_json::Error::io(std::io::Error::other(e)))
    .and_then(|parsed| parsed);
    parsed.map_err(|source| {
        let (bucket, key) = (store.bucket().to_owned(), key.to_owned());
        if source.is_io() {
            ManifestReadError::Stream {
                bucket,
                key,
                source,
            }
        } else {
            ManifestReadError::Parse {
                bucket,
                key,
                source,
            }
        }
    })
}

/// A manifest's top-level fields, its file entries handed to `each` one at a time.
struct Fold<'a, A, F> {
    acc: &'a mut A,
    each: F,
}

impl<'de, A, F: Fn(&mut A, ManifestFile) + Copy> serde::de::DeserializeSeed<'de>
    for Fold<'_, A, F>
{
    type Value = ManifestHead;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<ManifestHead, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, A, F: Fn(&mut A, ManifestFile) + Copy> serde::de::Visitor<'de> for Fold<'_, A, F> {
    type Value = ManifestHead;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a manifest object")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<ManifestHead, M::Error> {
        let mut head = ManifestHead::default();
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "version" => head.version = map.next_value()?,
                "kind" => head.kind = map.next_value()?,
                "generation" => head.generation = map.next_value()?,
                "created_at" => head.created_at = map.next_value()?,
                "step" => head.step = map.next_value()?,
                "world_size" => head.world_size = map.next_value()?,
                "files" => map.next_value_seed(Files {
                    acc: &mut *self.acc,
                    each: self.each,
                })?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

/// A manifest's `files` array, each entry handed to `each` as it is parsed.
struct Files<'a, A, F> {
    acc: &'a mut A,
    each: F,
}

impl<'de, A, F: Fn(&mut A, ManifestFile) + Copy> serde::de::DeserializeSeed<'de>
    for Files<'_, A, F>
{
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, A, F: Fn(&mut A, ManifestFile) + Copy> serde::de::Visitor<'de> for Files<'_, A, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of files")
    }

    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(file) = seq.next_element::<ManifestFile>()? {
            (self.each)(self.acc, file);
        }
        Ok(())
    }
}

/// Writes the manifest of single-pod `generation`: the commit point of an upload.
pub async fn put_manifest(
    store: &Store,
    generation: &Generation,
    manifest: &Manifest,
) -> Result<(), S3Error> {
    put_manifest_at(store, &store.manifest_key(generation), manifest).await
}

/// Writes `manifest` at `key`, with its step as metadata.
pub async fn put_manifest_at(store: &Store, key: &str, manifest: &Manifest) -> Result<(), S3Error> {
    put_json(store, key, manifest_body(manifest), manifest.step, false)
        .await
        .map(|_| ())
}

/// `manifest` as pretty JSON, in a buffer of exactly its size: measured first, so the body of
/// 100,000 files (~25 MiB) is not grown by doubling, which held up to twice that at once.
pub fn manifest_body(manifest: &Manifest) -> Vec<u8> {
    /// Counts what is written to it.
    struct Length(usize);
    impl std::io::Write for Length {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut length = Length(0);
    let _ = serde_json::to_writer_pretty(&mut length, manifest);
    let mut body = Vec::with_capacity(length.0);
    let _ = serde_json::to_writer_pretty(&mut body, manifest);
    body
}

/// What a conditional write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Written,
    /// `If-None-Match: *` and the object was there already.
    AlreadyThere,
}

/// PUTs a JSON body at `key` (retried), with `step` as metadata; with `only_if_absent`, as a
/// conditional write (`If-None-Match: *`).
pub async fn put_json(
    store: &Store,
    key: &str,
    body: Vec<u8>,
    step: Option<u64>,
    only_if_absent: bool,
) -> Result<Written, S3Error> {
    let crc = crate::checksum::crc32c(&body);
    // Shared by every attempt, not copied: a manifest of 100,000 files is ~25 MiB.
    let body = bytes::Bytes::from(body);
    let written = with_retries("writing a manifest", S3Error::is_retryable, |attempt| {
        let mut request = store
            .client()
            .put_object()
            .bucket(store.bucket())
            .key(key)
            .content_type("application/json")
            .set_metadata(step.map(|step| [(STEP_METADATA.to_owned(), step.to_string())].into()))
            .body(aws_sdk_s3::primitives::ByteStream::from(body.clone()));
        if store.checksum_mode() == ChecksumMode::Crc32c {
            request = request.checksum_crc32_c(crc32c_base64(crc));
        }
        if only_if_absent {
            request = request.if_none_match("*");
        }
        async move {
            match request.send().await {
                Ok(_) => Ok(Written::Written),
                Err(e) => {
                    let err = store.error(Operation::PutObject, key, e);
                    // A retry of a write whose answer was lost finds its own object: written.
                    match (err.status, attempt) {
                        (Some(412), 1) => Ok(Written::AlreadyThere),
                        (Some(412), _) => Ok(Written::Written),
                        _ => Err(err),
                    }
                }
            }
        }
    })
    .await?;
    Ok(written)
}

/// The `x-amz-checksum-crc32c` header value: base64 of the big-endian CRC.
pub fn crc32c_base64(crc: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

pub fn format_crc32c(crc: u32) -> String {
    format!("{crc:08x}")
}

pub fn parse_crc32c(value: &str) -> Option<u32> {
    if value.len() == 8 {
        u32::from_str_radix(value, 16).ok()
    } else {
        None
    }
}

pub fn format_crc64(crc: u64) -> String {
    format!("{crc:016x}")
}

pub fn parse_crc64(value: &str) -> Option<u64> {
    if value.len() == 16 {
        u64::from_str_radix(value, 16).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_a_manifest_sees_every_file_and_the_fields_a_full_parse_sees() {
        let (mut full, generation) = manifest(&["a/x.bin", "a/y.bin", "z.bin"]);
        full.step = Some(1200);
        full.world_size = Some(4);
        full.notice = Some(serde_json::json!({"kind": "spot", "files": [1, 2]}));
        let body = serde_json::to_vec_pretty(&full).expect("json");
        let mut seen: Vec<String> = Vec::new();
        let fold = Fold {
            acc: &mut seen,
            each: |seen: &mut Vec<String>, file: ManifestFile| seen.push(file.key),
        };
        let mut de = serde_json::Deserializer::from_slice(&body);
        let head = serde::de::DeserializeSeed::deserialize(fold, &mut de).expect("fold");
        assert_eq!(
            head,
            ManifestHead {
                version: MANIFEST_VERSION,
                kind: None,
                generation: generation.to_string(),
                created_at: full.created_at.clone(),
                step: Some(1200),
                world_size: Some(4),
            }
        );
        let keys: Vec<String> = full.files.into_iter().map(|f| f.key).collect();
        assert_eq!(
            seen, keys,
            "every entry, in order, and none from the notice"
        );
    }

    fn manifest(paths: &[&str]) -> (Manifest, Generation) {
        let generation = Generation::parse("20261124T021116123Z-00000001").expect("valid");
        let files = paths
            .iter()
            .map(|p| ManifestFile {
                path: (*p).to_owned(),
                size: 1,
                mode: 0o644,
                crc32c: "00000000".into(),
                crc64nvme: Some("0000000000000000".into()),
                key: format!("pre/job/gen/{generation}/{p}"),
                link: None,
            })
            .collect();
        (
            Manifest {
                version: MANIFEST_VERSION,
                generation: generation.to_string(),
                job: "job".into(),
                created_at: "2026-11-24T02:11:16Z".into(),
                node: None,
                pod: None,
                step: None,
                notice: None,
                rank: None,
                world_size: None,
                files,
            },
            generation,
        )
    }

    #[test]
    fn accepts_nested_relative_paths() {
        let (m, g) = manifest(&["a.bin", "dir/sub/b.bin", "dir/c"]);
        assert_eq!(m.validate(&g, "pre/job/gen/"), Ok(()));
    }

    #[test]
    fn refuses_paths_that_escape_the_directory() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "./a",
            "a\\..\\b",
            "",
        ] {
            let (m, g) = manifest(&[bad]);
            let err = m.validate(&g, "pre/job/gen/");
            assert!(
                matches!(
                    err,
                    Err(ManifestError::UnsafePath { .. }) | Err(ManifestError::ForeignKey { .. })
                ),
                "{bad:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn refuses_duplicate_paths_and_file_directory_clashes() {
        let (m, g) = manifest(&["a", "a"]);
        assert_eq!(
            m.validate(&g, "pre/job/gen/"),
            Err(ManifestError::DuplicatePath("a".into()))
        );
        let (m, g) = manifest(&["a", "a/b"]);
        assert!(matches!(
            m.validate(&g, "pre/job/gen/"),
            Err(ManifestError::UnsafePath { .. })
        ));
    }

    #[test]
    fn refuses_keys_outside_the_job() {
        let (mut m, g) = manifest(&["a"]);
        m.files[0].key = "other-job/gen/x/a".into();
        assert!(matches!(
            m.validate(&g, "pre/job/gen/"),
            Err(ManifestError::ForeignKey { .. })
        ));
    }

    #[test]
    fn refuses_the_names_restore_keeps_for_itself() {
        for reserved in [".nerve-old-20261124T021116123Z-00000001/a", ".nerve-done"] {
            let (m, g) = manifest(&[reserved]);
            assert!(
                matches!(
                    m.validate(&g, "pre/job/gen/"),
                    Err(ManifestError::UnsafePath { .. })
                ),
                "{reserved}"
            );
        }
        let (m, g) = manifest(&["sub/.nerve-old-x"]);
        assert_eq!(m.validate(&g, "pre/job/gen/"), Ok(()));
    }

    #[test]
    fn accepts_links_inside_and_refuses_links_out_and_files_below_links() {
        let link = |path: &str, target: &str| ManifestFile {
            path: path.into(),
            size: 0,
            mode: 0o777,
            crc32c: "00000000".into(),
            crc64nvme: None,
            key: String::new(),
            link: Some(target.into()),
        };
        let (mut m, g) = manifest(&["checkpoint-2/model.bin"]);
        m.files.push(link("last", "checkpoint-2"));
        m.files.push(link("checkpoint-2/alias.bin", "./model.bin"));
        assert_eq!(m.validate(&g, "pre/job/gen/"), Ok(()));
        for (path, target) in [("x", "/etc/passwd"), ("a/x", "../../etc"), ("x", "..")] {
            let (mut m, g) = manifest(&["checkpoint-2/model.bin"]);
            m.files.push(link(path, target));
            assert!(
                matches!(
                    m.validate(&g, "pre/job/gen/"),
                    Err(ManifestError::UnsafeLink { .. })
                ),
                "{path} -> {target}"
            );
        }
        // A link to /etc named `etc`, and a file `etc/passwd` written through it.
        let (mut m, g) = manifest(&["etc/passwd"]);
        m.files.push(link("etc", "."));
        assert!(matches!(
            m.validate(&g, "pre/job/gen/"),
            Err(ManifestError::UnsafePath {
                reason: "lies below a symbolic link",
                ..
            })
        ));
    }

    #[test]
    fn resolves_link_targets_lexically() {
        assert_eq!(resolve_link("a/b", "../c").as_deref(), Some("a/c"));
        assert_eq!(resolve_link("", "a/./b").as_deref(), Some("a/b"));
        assert_eq!(resolve_link("a", "..").as_deref(), Some(""));
        assert_eq!(resolve_link("", ".."), None);
        assert_eq!(resolve_link("", "/abs"), None);
    }
}
