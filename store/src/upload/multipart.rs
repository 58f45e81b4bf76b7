//! Sending one file: a single PutObject for small files, a multipart upload for large ones.
//!
//! Bytes are streamed from disk at their offsets (`ByteStream::read_from().offset().length()`),
//! so memory does not depend on file or part size. They are read through the file the upload
//! opened and checked (`read_path`, see [`super::OpenedFile`]), never by following the
//! checkpoint path again. Each part's checksums are computed by reading the range first; its
//! CRC32C is sent as `x-amz-checksum-crc32c`, so the store verifies what arrived, and the part
//! checksums combine into the whole-file ones the manifest records. Reading twice is also what
//! catches a file rewritten mid-upload: the store refuses a part whose bytes no longer match.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;

use super::UploadError;
use super::scan::LocalFile;
use crate::checksum::Checksums;
use crate::manifest::crc32c_base64;
use crate::progress::Progress;
use crate::s3::ChecksumMode;
use crate::s3::{Operation, S3Error, Store, with_retries};
use crate::{MAX_PART_SIZE, MIN_PART_SIZE};

/// S3's limit on parts per multipart upload.
pub const MAX_PARTS: u64 = 10_000;
/// Read size when checksumming and when streaming a part to the socket: big enough that the
/// syscalls and blocking-pool hops cost little, small enough that 16 requests in flight hold
/// only a few MiB.
pub const READ_BUFFER: usize = 256 * 1024;

/// How a file is cut into parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    pub file_size: u64,
    pub part_size: u64,
    /// 1 for a file sent with a single PutObject.
    pub parts: u64,
}

impl PartPlan {
    /// Files up to `requested` bytes go in one request; larger ones in parts of `requested`
    /// bytes, grown (in whole MiB) so no file needs more than [`MAX_PARTS`].
    pub fn for_file(file_size: u64, requested: u64) -> Option<PartPlan> {
        let requested = requested.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
        if file_size <= requested {
            return Some(PartPlan {
                file_size,
                part_size: requested,
                parts: 1,
            });
        }
        const MIB: u64 = 1024 * 1024;
        let needed = file_size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
        let part_size = requested.max(needed);
        if part_size > MAX_PART_SIZE {
            return None;
        }
        Some(PartPlan {
            file_size,
            part_size,
            parts: file_size.div_ceil(part_size),
        })
    }

    pub fn is_multipart(&self) -> bool {
        self.parts > 1
    }

    /// Offset and length of part `index` (0-based).
    pub fn range(&self, index: u64) -> (u64, u64) {
        let offset = index * self.part_size;
        (offset, self.part_size.min(self.file_size - offset))
    }
}

/// Checksums of `len` bytes of `path` from `offset` (blocking).
pub fn checksum_range(path: &Path, offset: u64, len: u64) -> std::io::Result<Checksums> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = file.take(len);
    let mut buf = vec![0u8; READ_BUFFER];
    let mut crc = Checksums::default();
    let mut seen = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc = crc.append(&buf[..n]);
        seen += n as u64;
    }
    if seen != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("expected {len} bytes at offset {offset}, the file ended after {seen}"),
        ));
    }
    Ok(crc)
}

/// Checksums of every part of a file in one sequential read (blocking).
pub fn checksum_parts(path: &Path, plan: &PartPlan) -> std::io::Result<Vec<Checksums>> {
    (0..plan.parts)
        .map(|index| {
            let (offset, len) = plan.range(index);
            checksum_range(path, offset, len)
        })
        .collect()
}

/// Whole-file checksums from the part checksums in order.
pub fn combine_part_crcs(plan: &PartPlan, crcs: &[Checksums]) -> Checksums {
    Checksums::concat(
        crcs.iter()
            .enumerate()
            .map(|(index, &crc)| (crc, plan.range(index as u64).1)),
    )
}

/// Multipart uploads created and not yet completed, so a failed run can abort them.
#[derive(Debug, Clone, Default)]
pub struct OpenUploads(Arc<Mutex<HashMap<String, String>>>);

impl OpenUploads {
    fn insert(&self, key: &str, upload_id: &str) {
        self.lock().insert(key.to_owned(), upload_id.to_owned());
    }

    fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    pub fn take_all(&self) -> Vec<(String, String)> {
        self.lock().drain().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every file of one upload shares.
pub struct Transfer<'a> {
    pub store: &'a Store,
    /// One permit per request in flight, across all parts and files larger than
    /// [`crate::SMALL_FILE`].
    pub requests: Arc<Semaphore>,
    /// One permit per small file being read and sent ([`crate::small_requests`]).
    pub small_requests: Semaphore,
    /// One permit per large file being sent: as many as requests, so that small files going
    /// wider leave large ones as they were (a few files at a time, each with its parts).
    pub large_files: Semaphore,
    /// Files being uploaded at once: as many as small files may be in flight.
    pub files_in_flight: usize,
    pub concurrency: usize,
    pub progress: Progress,
    pub open_uploads: OpenUploads,
    /// Where this upload's objects go (`.../gen/<generation>/`, or a rank's part under it).
    pub objects_prefix: String,
}

/// Sends `file`, read through `read_path`, to `key`; returns the whole-file checksums.
/// `known_crcs` are part checksums computed earlier (by the unchanged-file check), to avoid a
/// third read.
pub async fn send_file(
    transfer: &Transfer<'_>,
    file: &LocalFile,
    read_path: &Path,
    key: &str,
    plan: PartPlan,
    known_crcs: Option<Vec<Checksums>>,
) -> Result<Checksums, UploadError> {
    let source = Source { file, read_path };
    if plan.is_multipart() {
        send_multipart(transfer, source, key, plan, known_crcs).await
    } else {
        let known = known_crcs.and_then(|c| c.first().copied());
        send_single(transfer, source, key, known).await
    }
}

/// A file being sent: what the manifest calls it, and where its bytes are read.
#[derive(Clone, Copy)]
struct Source<'a> {
    file: &'a LocalFile,
    read_path: &'a Path,
}

fn is_retryable(err: &UploadError) -> bool {
    err.is_retryable()
}

/// Checksums of `len` bytes at `offset` for attempt `attempt` of sending them: the ones
/// computed up front (`known`) on the first attempt; a retry reads the bytes again, so it
/// checksums them again too.
async fn part_checksum(
    path: &Path,
    offset: u64,
    len: u64,
    known: Option<Checksums>,
    attempt: u32,
) -> Result<Checksums, UploadError> {
    if let Some(crc) = known
        && attempt == 1
    {
        return Ok(crc);
    }
    let owned: PathBuf = path.to_path_buf();
    tokio::task::spawn_blocking(move || checksum_range(&owned, offset, len))
        .await
        .map_err(|e| UploadError::ReadFile {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| UploadError::ReadFile {
            path: path.to_path_buf(),
            source,
        })
}

async fn body(path: &Path, offset: u64, len: u64) -> Result<ByteStream, UploadError> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .buffer_size(READ_BUFFER)
        .build()
        .await
        .map_err(|e| UploadError::ReadFile {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })
}

#[tracing::instrument(skip_all, fields(key = %key, size = source.file.stamp.size), err(Display))]
async fn send_single(
    transfer: &Transfer<'_>,
    source: Source<'_>,
    key: &str,
    known_crc: Option<Checksums>,
) -> Result<Checksums, UploadError> {
    let store = transfer.store;
    let (file, read_path) = (source.file, source.read_path);
    let len = file.stamp.size;
    let _permit = super::take_slot(&transfer.requests).await?;
    let crc = with_retries("uploading an object", is_retryable, |attempt| async move {
        let crc = part_checksum(read_path, 0, len, known_crc, attempt).await?;
        let mut request = store
            .client()
            .put_object()
            .bucket(store.bucket())
            .key(key)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(body(read_path, 0, len).await?);
        if store.checksum_mode() == ChecksumMode::Crc32c {
            request = request.checksum_crc32_c(crc32c_base64(crc.crc32c));
        }
        request
            .customize()
            .config_override(Store::body_timeouts(len))
            .send()
            .await
            .map_err(|e| UploadError::Object {
                path: file.path.clone(),
                source: store.error(Operation::PutObject, key, e),
            })?;
        Ok(crc)
    })
    .await?;
    transfer.progress.add_done(len);
    Ok(crc)
}

#[tracing::instrument(skip_all, fields(key = %key, size = source.file.stamp.size, parts = plan.parts), err(Display))]
async fn send_multipart(
    transfer: &Transfer<'_>,
    source: Source<'_>,
    key: &str,
    plan: PartPlan,
    known_crcs: Option<Vec<Checksums>>,
) -> Result<Checksums, UploadError> {
    let store = transfer.store;
    let file = source.file;
    let with_checksums = store.checksum_mode() == ChecksumMode::Crc32c;
    let upload_id = {
        let _permit = super::take_slot(&transfer.requests).await?;
        with_retries(
            "starting a multipart upload",
            S3Error::is_retryable,
            |_| async {
                let mut request = store
                    .client()
                    .create_multipart_upload()
                    .bucket(store.bucket())
                    .key(key);
                if with_checksums {
                    request = request.checksum_algorithm(ChecksumAlgorithm::Crc32C);
                }
                let output = request
                    .send()
                    .await
                    .map_err(|e| store.error(Operation::CreateMultipartUpload, key, e))?;
                // Register before anything else can fail, so a failed run aborts it.
                if let Some(id) = output.upload_id() {
                    transfer.open_uploads.insert(key, id);
                }
                Ok(output.upload_id().map(str::to_owned))
            },
        )
        .await
        .map_err(|source| UploadError::Object {
            path: file.path.clone(),
            source,
        })?
        .ok_or_else(|| UploadError::NoUploadId {
            key: key.to_owned(),
        })?
    };

    let upload_id = upload_id.as_str();
    let known_crcs = known_crcs.as_deref();
    // Made as slots free up (a file may have 10,000 parts), boxed with an explicit `Send`: a
    // closure returning the bare borrowing future is not provably `Send` (rust#102211).
    let parts: Vec<(CompletedPart, Checksums)> = futures::stream::iter(0..plan.parts)
        .map(
            |index| -> BoxFuture<'_, Result<(CompletedPart, Checksums), UploadError>> {
                let known = known_crcs.and_then(|c| c.get(usize::try_from(index).ok()?).copied());
                Box::pin(send_part(
                    transfer, source, key, upload_id, plan, index, known,
                ))
            },
        )
        .buffered(transfer.concurrency)
        .try_collect()
        .await?;
    let crcs: Vec<Checksums> = parts.iter().map(|(_, crc)| *crc).collect();
    let completed: Vec<CompletedPart> = parts.into_iter().map(|(part, _)| part).collect();

    let _permit = super::take_slot(&transfer.requests).await?;
    with_retries(
        "completing a multipart upload",
        S3Error::is_retryable,
        |_| {
            let completed = completed.clone();
            async move {
                let result = store
                    .client()
                    .complete_multipart_upload()
                    .bucket(store.bucket())
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(completed))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| store.error(Operation::CompleteMultipartUpload, key, e));
                match result {
                    Ok(_) => Ok(()),
                    // An earlier request completed it but its answer was lost: the upload id is
                    // gone and the object is there with the right size. The earlier request may
                    // be the SDK's own, inside this same attempt.
                    Err(err) if err.is_not_found() => {
                        let head = store
                            .client()
                            .head_object()
                            .bucket(store.bucket())
                            .key(key)
                            .send()
                            .await
                            .map_err(|e| store.error(Operation::HeadObject, key, e))?;
                        if head.content_length().and_then(|l| u64::try_from(l).ok())
                            == Some(plan.file_size)
                        {
                            Ok(())
                        } else {
                            Err(err)
                        }
                    }
                    Err(err) => Err(err),
                }
            }
        },
    )
    .await
    .map_err(|source| UploadError::Object {
        path: file.path.clone(),
        source,
    })?;
    transfer.open_uploads.remove(key);
    Ok(combine_part_crcs(&plan, &crcs))
}

async fn send_part(
    transfer: &Transfer<'_>,
    source: Source<'_>,
    key: &str,
    upload_id: &str,
    plan: PartPlan,
    index: u64,
    known_crc: Option<Checksums>,
) -> Result<(CompletedPart, Checksums), UploadError> {
    let store = transfer.store;
    let read_path = source.read_path;
    let (offset, len) = plan.range(index);
    let part_number = i32::try_from(index + 1).unwrap_or(i32::MAX);
    let _permit = super::take_slot(&transfer.requests).await?;
    let result = with_retries("uploading a part", is_retryable, |attempt| async move {
        let crc = part_checksum(read_path, offset, len, known_crc, attempt).await?;
        let mut request = store
            .client()
            .upload_part()
            .bucket(store.bucket())
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(body(read_path, offset, len).await?);
        let checksum =
            (store.checksum_mode() == ChecksumMode::Crc32c).then(|| crc32c_base64(crc.crc32c));
        if let Some(checksum) = &checksum {
            request = request.checksum_crc32_c(checksum);
        }
        let output = request
            .customize()
            .config_override(Store::body_timeouts(len))
            .send()
            .await
            .map_err(|e| UploadError::PartFailed {
                key: key.to_owned(),
                part_number,
                source: store.error(Operation::UploadPart, key, e),
            })?;
        let part = CompletedPart::builder()
            .part_number(part_number)
            .set_e_tag(output.e_tag().map(str::to_owned))
            .set_checksum_crc32_c(checksum)
            .build();
        Ok((part, crc))
    })
    .await?;
    transfer.progress.add_done(len);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn small_files_go_in_one_request() {
        let plan = PartPlan::for_file(16 * MIB, 16 * MIB).expect("plan");
        assert!(!plan.is_multipart());
        let plan = PartPlan::for_file(0, 16 * MIB).expect("plan");
        assert_eq!(plan.parts, 1);
    }

    #[test]
    fn part_size_grows_to_stay_within_ten_thousand_parts() {
        let plan = PartPlan::for_file(1024 * 1024 * MIB, 16 * MIB).expect("plan");
        assert!(plan.parts <= MAX_PARTS);
        assert_eq!(plan.part_size % MIB, 0);
        assert!(plan.part_size > 16 * MIB);
        assert!(PartPlan::for_file(60 * 1024 * 1024 * MIB, 16 * MIB).is_none());
    }

    #[test]
    fn parts_cover_the_file_exactly() {
        let plan = PartPlan::for_file(40 * MIB + 3, 16 * MIB).expect("plan");
        assert_eq!(plan.parts, 3);
        assert_eq!(plan.range(0), (0, 16 * MIB));
        assert_eq!(plan.range(2), (32 * MIB, 8 * MIB + 3));
    }

    #[test]
    fn combined_part_crcs_equal_the_whole_file_crc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(11 * MIB + 17)).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let plan = PartPlan::for_file(data.len() as u64, 5 * MIB).expect("plan");
        assert_eq!(plan.parts, 3);
        let crcs = checksum_parts(&path, &plan).expect("crcs");
        assert_eq!(combine_part_crcs(&plan, &crcs), Checksums::of(&data));
        assert_eq!(
            combine_part_crcs(&plan, &crcs).crc32c,
            crc32c::crc32c(&data)
        );
    }
}
