//! Downloading one file of a generation into staging: one GET for small files, parallel
//! ranged GETs for large ones, each range written at its offset as it arrives (memory does not
//! depend on file size) and checksummed on the way; range CRCs combine into the file CRC that
//! is checked against the manifest.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tokio_util::task::AbortOnDropHandle;

use super::{Owner, RestoreError, RestoreOptions};
use crate::checksum::Checksums;
use crate::manifest::{Manifest, ManifestFile, format_crc32c, format_crc64, parse_crc32c};
use crate::progress::Progress;
use crate::s3::{Operation, Store, with_retries};
use crate::{SMALL_FILE, small_requests};

/// Bytes gathered from the socket before one positioned write: few syscalls, and with 16 ranges
/// in flight only a few MiB held.
///
/// The write runs on the task itself, not on the blocking pool: copying 256 KiB into the page
/// cache takes tens of microseconds, while the hop (queueing the closure, waking a pool thread,
/// waking the task again) cost more CPU than the write and was most of restore's context
/// switches. Measured on the DCP bench set (2 GiB): ~1.5 -> ~1.2 CPU s per restore. 1 MiB
/// batches (inline or on the pool) measured no cheaper and hold 4x the memory per range.
const WRITE_BATCH: usize = 256 * 1024;

/// What every range download of one restore shares.
pub struct Download {
    pub store: Store,
    /// One permit per ranged GET in flight, across all files larger than [`SMALL_FILE`].
    pub requests: Arc<Semaphore>,
    /// One permit per small file being fetched and written ([`crate::small_requests`]).
    pub small_requests: Semaphore,
    /// One permit per large file being restored: as many as requests, so that small files going
    /// wider leave large ones as they were.
    pub large_files: Semaphore,
    /// Files in flight at most: as many as small files may be.
    pub files_in_flight: usize,
    /// Ranges of one file in flight at most, see [`ranges_per_file`].
    pub ranges_per_file: usize,
    pub range_size: u64,
    pub progress: Progress,
    /// Who owns each restored file, when restore runs with more privilege than the trainer.
    pub owner: Option<Owner>,
}

impl Download {
    /// What the downloads of `manifest` share, sized by `options`.
    pub fn new(
        store: &Store,
        manifest: &Manifest,
        options: &RestoreOptions,
        progress: &Progress,
    ) -> Download {
        let concurrency = options.concurrency.max(1);
        let range_size = options.range_size.max(1);
        let ranged = manifest
            .files
            .iter()
            .filter(|f| f.size > range_size)
            .count();
        Download {
            store: store.clone(),
            requests: Arc::new(Semaphore::new(concurrency)),
            small_requests: Semaphore::new(small_requests(concurrency)),
            large_files: Semaphore::new(concurrency),
            files_in_flight: small_requests(concurrency),
            ranges_per_file: ranges_per_file(concurrency, ranged),
            range_size,
            progress: progress.clone(),
            owner: options.owner,
        }
    }
}

/// Large files fetched side by side, at most: the request budget is shared among this many.
const FILES_SIDE_BY_SIDE: usize = 4;

/// Ranges of one file in flight at most: all of `concurrency` for a lone large file (one big
/// shard still gets every stream), shared among up to [`FILES_SIDE_BY_SIDE`] when the
/// manifest has several, so that writes go to several files at once. Buffered writes to one
/// file are serialised by the kernel; with every range on one file, one worker wrote while the
/// other waited. HF bench set (4 x 512 MiB + 1 GiB), 2 cores, 4 alternating runs: 1.33 s wall
/// and 1.00 CPU s with ranges spread over 4 files, against 1.64 s and 1.53 CPU s with all 16
/// on one file at a time (s5cmd: 1.61 s, 1.69 CPU s).
pub fn ranges_per_file(concurrency: usize, large_files: usize) -> usize {
    let sharing = large_files.clamp(1, FILES_SIDE_BY_SIDE);
    concurrency.div_ceil(sharing).max(1)
}

/// Downloads `file` to `dest` (whose directory exists), verifies its size and checksums, sets
/// its permissions (never setuid, setgid or sticky) and owner.
pub async fn download_file(
    download: &Arc<Download>,
    file: &ManifestFile,
    dest: PathBuf,
) -> Result<(), RestoreError> {
    if file.size <= SMALL_FILE {
        download_small(download, file, &dest).await?;
    } else {
        download_large(download, file, dest).await?;
    }
    download.progress.file_done();
    Ok(())
}

/// A file larger than [`SMALL_FILE`]: created at its final size, fetched in ranges (each its
/// own task), each written at its offset as it arrives.
async fn download_large(
    download: &Arc<Download>,
    file: &ManifestFile,
    dest: PathBuf,
) -> Result<(), RestoreError> {
    let io_error = |source| RestoreError::Write {
        path: dest.clone(),
        source,
    };
    let _slot = take_slot(&download.large_files).await?;
    let handle = {
        let (dest, size) = (dest.clone(), file.size);
        tokio::task::spawn_blocking(move || create_sized(&dest, size))
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?
    };
    let ranges = file.size.div_ceil(download.range_size);
    let file_ref = Arc::new(FileRef {
        path: file.path.clone(),
        key: file.key.clone(),
        size: file.size,
        dest: dest.clone(),
        handle,
        write_turn: tokio::sync::Mutex::new(()),
    });
    // Each range is its own task, so a runtime with several workers fetches, checksums and
    // writes ranges of one large file in parallel. Spawned lazily (at most `ranges_per_file`
    // at a time) and aborted when dropped, i.e. when another range or file failed.
    let crcs: Vec<(Checksums, u64)> = futures::stream::iter(0..ranges)
        .map(|index| {
            let offset = index * download.range_size;
            let len = download.range_size.min(file.size - offset);
            let (download, file_ref) = (download.clone(), file_ref.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                fetch_range(&download, &file_ref, offset, len, ranges > 1).await
            }))
        })
        .buffered(download.ranges_per_file)
        .map(|joined| joined.map_err(|e| io_error(std::io::Error::other(e)))?)
        .try_collect()
        .await?;
    verify(file, Checksums::concat(crcs))?;
    finish_file(&file_ref.handle, file.mode, download.owner).map_err(io_error)
}

/// A file of at most [`SMALL_FILE`] bytes: one GET into memory, verified before it touches the
/// disk, then created and written in one go on the task itself (a few microseconds, like a
/// range's write batch; see [`WRITE_BATCH`]). No preallocation: a single write of a fresh file
/// is one extent anyway.
async fn download_small(
    download: &Download,
    file: &ManifestFile,
    dest: &Path,
) -> Result<(), RestoreError> {
    let _permit = take_slot(&download.small_requests).await?;
    // An empty file has nothing to fetch.
    let bytes = if file.size == 0 {
        Bytes::new()
    } else {
        with_retries("downloading", RestoreError::is_retryable, |_| {
            fetch_whole(&download.store, file)
        })
        .await?
    };
    verify(file, Checksums::of(&bytes))?;
    let io_error = |source| RestoreError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(io_error)?;
    std::io::Write::write_all(&mut handle, &bytes).map_err(io_error)?;
    finish_file(&handle, file.mode, download.owner).map_err(io_error)?;
    download.progress.add_done(file.size);
    Ok(())
}

/// The whole object of a small `file`, refused when it is not the manifest's size.
async fn fetch_whole(store: &Store, file: &ManifestFile) -> Result<Bytes, RestoreError> {
    let response = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(&file.key)
        .send()
        .await
        .map_err(|e| RestoreError::Download {
            path: file.path.clone(),
            source: store.error(Operation::GetObject, &file.key, e),
        })?;
    let size_mismatch = || RestoreError::SizeMismatch {
        path: file.path.clone(),
        key: file.key.clone(),
        expected: file.size,
    };
    let expected = usize::try_from(file.size).map_err(|_| size_mismatch())?;
    let mut body = response.body;
    let mut bytes = bytes::BytesMut::with_capacity(expected);
    while let Some(chunk) = body.try_next().await.map_err(|source| RestoreError::Body {
        path: file.path.clone(),
        key: file.key.clone(),
        source,
    })? {
        if bytes.len() + chunk.len() > expected {
            return Err(size_mismatch());
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.len() != expected {
        return Err(size_mismatch());
    }
    Ok(bytes.freeze())
}

/// Refuses `crc` unless it is what the manifest records for `file` (CRC32C, and CRC-64/NVME
/// where recorded).
fn verify(file: &ManifestFile, crc: Checksums) -> Result<(), RestoreError> {
    let mismatch = |expected: &str, actual: String| RestoreError::ChecksumMismatch {
        path: file.path.clone(),
        key: file.key.clone(),
        expected: expected.to_owned(),
        actual,
    };
    if parse_crc32c(&file.crc32c) != Some(crc.crc32c) {
        return Err(mismatch(&file.crc32c, format_crc32c(crc.crc32c)));
    }
    if let Some(expected) = &file.crc64nvme
        && *expected != format_crc64(crc.crc64nvme)
    {
        return Err(mismatch(expected, format_crc64(crc.crc64nvme)));
    }
    Ok(())
}

/// Gives a restored file its permission bits (never setuid, setgid or sticky) and owner.
fn finish_file(handle: &std::fs::File, mode: u32, owner: Option<Owner>) -> std::io::Result<()> {
    handle.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(handle, Some(owner.uid), Some(owner.gid))?;
    }
    Ok(())
}

/// Creates `dest` at its final size with its blocks reserved up front (`fallocate`).
///
/// Writing into reserved blocks skips ext4's per-block delayed-allocation bookkeeping, which was
/// most of the write path's CPU: 2 GiB in 256 KiB `pwrite`s cost 0.20 s of system time into a
/// reserved file against 0.34 s into a sparse one. A disk too small for the file also fails
/// here, before any byte of it is fetched. Filesystems without `fallocate` get a sparse file.
fn create_sized(dest: &Path, size: u64) -> std::io::Result<std::fs::File> {
    use nix::errno::Errno;
    use nix::fcntl::{FallocateFlags, fallocate};

    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)?;
    if let Ok(len) = i64::try_from(size)
        && len > 0
    {
        match fallocate(&file, FallocateFlags::empty(), 0, len) {
            Ok(()) => return Ok(file),
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    file.set_len(size)?;
    Ok(file)
}

/// A file being restored, as its range tasks see it.
struct FileRef {
    /// Path in the manifest.
    path: String,
    key: String,
    size: u64,
    /// Where it is written in staging.
    dest: PathBuf,
    handle: std::fs::File,
    /// Held while writing. The kernel serialises buffered writes to one file anyway (ext4 and
    /// XFS take the inode lock exclusively), but a writer that finds it taken spins on it while
    /// the holder runs, and the holder runs long when page-cache allocation has to reclaim
    /// first: with two workers writing ranges of one 512 MiB shard, `rwsem_spin_on_owner` was
    /// the top symbol of a slow 3 GiB restore on a machine whose page cache was full. Waiting
    /// here instead lets the worker fetch other ranges meanwhile.
    write_turn: tokio::sync::Mutex<()>,
}

/// GETs `len` bytes at `offset` (with a Range header when the file has several ranges) and
/// writes them at that offset; returns the range's checksums and length.
async fn fetch_range(
    download: &Download,
    file: &FileRef,
    offset: u64,
    len: u64,
    ranged: bool,
) -> Result<(Checksums, u64), RestoreError> {
    let _permit = take_slot(&download.requests).await?;
    let store = &download.store;
    let progress = &download.progress;
    let (handle, dest) = (&file.handle, file.dest.as_path());
    with_retries("downloading", RestoreError::is_retryable, |_| {
        async move {
            let mut request = store
                .client()
                .get_object()
                .bucket(store.bucket())
                .key(&file.key);
            if ranged {
                request = request.range(format!("bytes={}-{}", offset, offset + len - 1));
            }
            let response = request.send().await.map_err(|e| RestoreError::Download {
                path: file.path.clone(),
                source: store.error(Operation::GetObject, &file.key, e),
            })?;
            let mut body = response.body;
            let mut crc = Checksums::default();
            let mut written = 0u64;
            let mut batch: Vec<Bytes> = Vec::new();
            let mut batch_len = 0usize;
            let mut counted = 0u64;
            let result = async {
                loop {
                    let chunk = body.try_next().await.map_err(|source| RestoreError::Body {
                        path: file.path.clone(),
                        key: file.key.clone(),
                        source,
                    })?;
                    let done = chunk.is_none();
                    if let Some(chunk) = chunk {
                        if written + batch_len as u64 + chunk.len() as u64 > len {
                            return Err(RestoreError::SizeMismatch {
                                path: file.path.clone(),
                                key: file.key.clone(),
                                expected: file.size,
                            });
                        }
                        crc = crc.append(&chunk);
                        batch_len += chunk.len();
                        batch.push(chunk);
                    }
                    if batch_len >= WRITE_BATCH || (done && batch_len > 0) {
                        // Inline, see WRITE_BATCH; one range of a file at a time, see
                        // FileRef::write_turn.
                        let _turn = file.write_turn.lock().await;
                        let mut at = offset + written;
                        for chunk in batch.drain(..) {
                            handle.write_all_at(&chunk, at).map_err(|source| {
                                RestoreError::Write {
                                    path: dest.to_path_buf(),
                                    source,
                                }
                            })?;
                            at += chunk.len() as u64;
                        }
                        written += batch_len as u64;
                        progress.add_done(batch_len as u64);
                        counted += batch_len as u64;
                        batch_len = 0;
                    }
                    if done {
                        break;
                    }
                }
                if written != len {
                    return Err(RestoreError::SizeMismatch {
                        path: file.path.clone(),
                        key: file.key.clone(),
                        expected: file.size,
                    });
                }
                Ok((crc, len))
            }
            .await;
            if result.is_err() {
                // The range is fetched again from its start.
                progress.sub_done(counted);
            }
            result
        }
    })
    .await
}

/// A slot of one of the restore's bounds (never closed while a restore runs).
async fn take_slot(bound: &Semaphore) -> Result<tokio::sync::SemaphorePermit<'_>, RestoreError> {
    bound
        .acquire()
        .await
        .map_err(|_| RestoreError::Cancelled("--dir".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_large_file_gets_every_request_and_several_share_them() {
        assert_eq!(ranges_per_file(16, 0), 16);
        assert_eq!(ranges_per_file(16, 1), 16);
        assert_eq!(ranges_per_file(16, 2), 8);
        assert_eq!(ranges_per_file(16, 5), 4);
        assert_eq!(ranges_per_file(16, 500), 4);
        assert_eq!(ranges_per_file(3, 4), 1);
        assert_eq!(ranges_per_file(1, 1), 1);
    }
}
