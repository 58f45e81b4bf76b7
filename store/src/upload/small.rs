//! Small files: read whole into memory through a descriptor proven to be the scanned file,
//! checksummed from that copy, then reused or sent from it in one PutObject.
//!
//! For a file of a few KiB the per-file steps of a large one cost more than its bytes: a
//! checksum pass, a second open through `/proc/self/fd/N` for the SDK's streamed body and a
//! blocking-pool hop for each read. Here one hop opens, checks, reads and checksums the file;
//! the bytes sent are the bytes checksummed, and a retry sends the same bytes again.

use std::io::Read;
use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::multipart::Transfer;
use super::scan::{FileStamp, LocalFile};
use super::{Attempt, OpenFailure, ReuseIndex, UploadError, open_checked, stored_entry};
use crate::checksum::Checksums;
use crate::manifest::crc32c_base64;
use crate::s3::{ChecksumMode, Operation, with_retries};

/// Sends `file` (at most [`crate::SMALL_FILE`] bytes; no body this size needs more than the default
/// answer timeout, so it goes without a per-request timeout override) unless an earlier object holds the same bytes.
pub(super) async fn send_small(
    transfer: &Transfer<'_>,
    file: &LocalFile,
    reuse: &ReuseIndex,
) -> Result<Attempt, UploadError> {
    let _permit = super::take_slot(&transfer.small_requests).await?;
    let (path, stamp) = (file.abs_path.clone(), file.stamp);
    let read = tokio::task::spawn_blocking(move || read_whole(&path, &stamp))
        .await
        .unwrap_or_else(|e| Err(OpenFailure::Io(std::io::Error::other(e))));
    let (bytes, crc) = match read {
        Ok(read) => read,
        Err(failure) => return failure.ends_attempt(&file.abs_path),
    };
    let size = file.stamp.size;
    if let Some(key) = reuse.key_of(size, crc) {
        transfer.progress.add_reused(size);
        return Ok(Attempt::Sent(stored_entry(file, key.to_owned(), crc), true));
    }
    let key = format!("{}{}", transfer.objects_prefix, file.path);
    put_small(transfer, file, &key, bytes, crc).await?;
    transfer.progress.add_done(size);
    Ok(Attempt::Sent(stored_entry(file, key, crc), false))
}

/// The bytes and checksums of the file at `path`, opened as the file `stamp` describes and
/// holding exactly `stamp.size` bytes (blocking). A different size means it changed since it
/// was stamped: [`OpenFailure::Replaced`], so it is stamped and read again.
fn read_whole(path: &Path, stamp: &FileStamp) -> Result<(Bytes, Checksums), OpenFailure> {
    let file = open_checked(path, stamp)?;
    let expected = usize::try_from(stamp.size).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(expected);
    // One byte more than expected, to see a file that grew.
    file.take(stamp.size + 1)
        .read_to_end(&mut bytes)
        .map_err(OpenFailure::Io)?;
    if bytes.len() != expected {
        return Err(OpenFailure::Replaced);
    }
    let crc = Checksums::of(&bytes);
    Ok((Bytes::from(bytes), crc))
}

/// One PutObject of `bytes` to `key`, retried; the store verifies the CRC32C it is sent.
async fn put_small(
    transfer: &Transfer<'_>,
    file: &LocalFile,
    key: &str,
    bytes: Bytes,
    crc: Checksums,
) -> Result<(), UploadError> {
    let store = transfer.store;
    let checksum =
        (store.checksum_mode() == ChecksumMode::Crc32c).then(|| crc32c_base64(crc.crc32c));
    with_retries("uploading an object", UploadError::is_retryable, |_| {
        let request = store
            .client()
            .put_object()
            .bucket(store.bucket())
            .key(key)
            .content_length(i64::try_from(bytes.len()).unwrap_or(i64::MAX))
            .set_checksum_crc32_c(checksum.clone())
            .body(ByteStream::from(bytes.clone()));
        async move {
            request.send().await.map_err(|e| UploadError::Object {
                path: file.path.clone(),
                source: store.error(Operation::PutObject, key, e),
            })
        }
    })
    .await
    .map(|_| ())
}
