//! nerve-store: a training job's checkpoints in S3, as *generations*.
//!
//! A generation is a checkpoint directory uploaded under `<prefix>/<job>/gen/<generation>/` and
//! committed by a manifest written last, so readers never see a partial one. This crate uploads
//! (parallel multipart streams from disk, small files whole from memory, bounded requests in
//! flight, CRC32C end to end, unchanged files reused from the previous generation), restores
//! (staged beside the directory, verified, then swapped in), lists and prunes generations.
//! Memory does not grow with checkpoint size; with the file count it grows by the manifest's
//! own entries only (docs/transfer.md, "Memory").
//!
//! It deliberately knows nothing of notices, signals, trainers or command lines: the sidecar
//! decides *when* to checkpoint and passes this crate its own option types.

pub mod checksum;
pub mod exclude;
pub mod generation;
pub mod job_notice;
pub mod layout;
pub mod list;
pub mod manifest;
pub mod metrics;
pub mod part;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod s3;
pub mod step;
pub mod upload;

pub use generation::Generation;
pub use list::{Committed, committed_in_step_order, list_generations, newest_generation};
pub use manifest::{Manifest, ManifestFile, fetch_manifest};
pub use progress::Progress;
pub use prune::{PruneSummary, prune_generations};
pub use restore::{
    RestoreError, RestoreOptions, RestoreOutcome, RestoreSummary, restore_generation,
    restore_generation_with,
};
pub use s3::{ChecksumMode, Destination, S3Error, Store, StoreConfig};
pub use upload::{
    ManifestContext, UploadError, UploadOptions, UploadSummary, upload_generation,
    upload_generation_with_progress,
};

/// Requests in flight across all files and parts of one transfer.
///
/// bench/transfer --sweep (3 GiB, local s3s-fs server, 2 shared cores): 8, 16 and 32 were
/// within run-to-run noise of each other; 32 costs ~18 MiB more RSS. 16 keeps enough
/// connections busy to hide per-request latency against real S3 (tens of ms to first byte)
/// while staying well under the 64 MiB memory budget (~35 MiB peak measured).
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Files up to this size are moved whole through memory: read, checksummed and sent in one
/// PutObject on upload; fetched with one GET, verified and written with one write on restore,
/// without the per-file steps large files need (a checksum pass before a streamed body,
/// preallocation, range tasks). Small enough that [`small_requests`] of them in flight (64 at
/// the default concurrency) hold at most 16 MiB, as much as the streamed path's buffers.
pub const SMALL_FILE: u64 = 256 * 1024;

/// Small objects (up to [`SMALL_FILE`]) in flight per request of `--concurrency`.
///
/// A small object costs the client microseconds and the store one round trip: what bounds
/// small-file throughput is requests in flight, not cores (against S3's tens of milliseconds
/// per PUT, 16 in flight move a few hundred files a second). Each holds at most one small
/// file's bytes, so 64 (at the default concurrency) hold at most 16 MiB; S3 accepts 3,500 PUTs
/// and 5,500 GETs a second per prefix, far above what 64 in flight ask of it.
pub const SMALL_OBJECTS_PER_REQUEST: usize = 4;

/// Small objects in flight for a transfer of `concurrency` requests (at most
/// [`MAX_CONCURRENCY`]).
pub fn small_requests(concurrency: usize) -> usize {
    concurrency
        .saturating_mul(SMALL_OBJECTS_PER_REQUEST)
        .clamp(1, MAX_CONCURRENCY)
}

/// Upper bound for the requests in flight: every request holds a socket and a buffer, and S3
/// throttles a single prefix long before this.
pub const MAX_CONCURRENCY: usize = 256;

/// Multipart part size when the file is small enough to use it (larger files get larger parts).
///
/// Measured with bench/transfer: files up to this size go in one request, and at 32 MiB the
/// 64 x 32 MiB torch.distributed.checkpoint shards upload in 4.6-5.0 s against 7.6-8.7 s at
/// 16 MiB (two parts each plus a CompleteMultipartUpload); 512 MiB shards are as fast as at
/// 16 or 64 MiB, and a retried part stays cheap. Restore uses it as the ranged-GET size.
pub const DEFAULT_PART_SIZE: u64 = 32 * MIB;
/// S3's minimum part size (all parts but the last).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's maximum part size.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;

const MIB: u64 = 1024 * 1024;
