//! The manifest: the commit record of a generation, written last.
//!
//! It lists every file of the checkpoint with its relative path, size, mode, CRC32C and the key
//! holding its bytes (which may belong to an earlier generation when the file did not change).
//! Readers never trust it blindly: [`Manifest::validate`] refuses paths that would land outside
//! the checkpoint directory, duplicate paths, and keys outside the job's prefix.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::generation::Generation;
use crate::s3::ChecksumMode;
use crate::s3::{Operation, S3Error, Store, with_retries};

/// `<generation>.manifest.json` beside the generation's object folder.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Format version written by this build; readers refuse newer ones.
pub const MANIFEST_VERSION: u32 = 1;
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
    /// Full object key holding the bytes.
    pub key: String,
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
    #[error("manifest checksum `{crc}` for `{path}` is not 8 hex digits")]
    BadChecksum { path: String, crc: String },
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
        if self.version > MANIFEST_VERSION {
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
        for file in &self.files {
            check_relative_path(&file.path)?;
            if !seen.insert(file.path.as_str()) {
                return Err(ManifestError::DuplicatePath(file.path.clone()));
            }
            let mut parent = file.path.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                dirs.insert(dir);
                parent = dir;
            }
            let key_ok = file
                .key
                .strip_prefix(generations_prefix)
                .is_some_and(|rest| !rest.is_empty() && !rest.split('/').any(|s| s == ".."));
            if !key_ok {
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
            ManifestReadError::Body { .. } => true,
            _ => false,
        }
    }
}

/// Downloads, parses and validates the manifest of `generation`.
pub async fn fetch_manifest(
    store: &Store,
    generation: &Generation,
) -> Result<Manifest, ManifestReadError> {
    let key = store.manifest_key(generation);
    let bucket = store.bucket().to_owned();
    with_retries(
        "fetching the manifest",
        ManifestReadError::is_retryable,
        |_| async {
            let response = store
                .client()
                .get_object()
                .bucket(&bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| {
                    ManifestReadError::Fetch(store.error(Operation::GetObject, &key, e))
                })?;
            let length = response
                .content_length()
                .and_then(|l| u64::try_from(l).ok());
            if length.is_some_and(|l| l > MAX_MANIFEST_BYTES) {
                return Err(ManifestReadError::TooLarge {
                    bucket: bucket.clone(),
                    key: key.clone(),
                });
            }
            let body = response
                .body
                .collect()
                .await
                .map_err(|source| ManifestReadError::Body {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    source,
                })?;
            let manifest: Manifest =
                serde_json::from_slice(&body.into_bytes()).map_err(|source| {
                    ManifestReadError::Parse {
                        bucket: bucket.clone(),
                        key: key.clone(),
                        source,
                    }
                })?;
            manifest
                .validate(generation, store.generations_prefix())
                .map_err(|source| ManifestReadError::Invalid {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    source,
                })?;
            Ok(manifest)
        },
    )
    .await
}

/// Writes the manifest of `generation`: the commit point of an upload.
pub async fn put_manifest(
    store: &Store,
    generation: &Generation,
    manifest: &Manifest,
) -> Result<(), S3Error> {
    let key = store.manifest_key(generation);
    let body = serde_json::to_vec_pretty(manifest).unwrap_or_default();
    let crc = crate::checksum::crc32c(&body);
    with_retries("writing the manifest", S3Error::is_retryable, |_| {
        let mut request = store
            .client()
            .put_object()
            .bucket(store.bucket())
            .key(&key)
            .content_type("application/json")
            .body(aws_sdk_s3::primitives::ByteStream::from(body.clone()));
        if store.checksum_mode() == ChecksumMode::Crc32c {
            request = request.checksum_crc32_c(crc32c_base64(crc));
        }
        async {
            request
                .send()
                .await
                .map(|_| ())
                .map_err(|e| store.error(Operation::PutObject, &key, e))
        }
    })
    .await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(paths: &[&str]) -> (Manifest, Generation) {
        let generation = Generation::parse("20261124T021116123Z-00000001").expect("valid");
        let files = paths
            .iter()
            .map(|p| ManifestFile {
                path: (*p).to_owned(),
                size: 1,
                mode: 0o644,
                crc32c: "00000000".into(),
                key: format!("pre/job/gen/{generation}/{p}"),
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
}
