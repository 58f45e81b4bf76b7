//! nerve-sidecar: the per-pod sidecar that gets a training job's checkpoint into object storage
//! before the machine goes away, and puts it back when the next pod starts.
//!
//! The transfer engine (`upload`, `restore`, `list`, `prune`) moves checkpoint directories to and
//! from S3 as *generations*: objects under `<prefix>/<job>/gen/<generation>/` committed by a
//! manifest written last. It streams from disk (memory does not grow with checkpoint size),
//! bounds requests in flight, verifies CRC32C end to end, and reuses unchanged files.
//!
//! It deliberately does not decide *when* to checkpoint; that is `run`'s job.

pub mod checksum;
pub mod cli;
pub mod generation;
pub mod inject;
pub mod list;
pub mod manifest;
pub mod metrics;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod run;
pub mod store;
pub mod upload;

pub use generation::Generation;
pub use list::list_generations;
pub use manifest::{Manifest, ManifestFile};
pub use progress::Progress;
pub use prune::{PruneSummary, prune_generations};
pub use restore::{
    RestoreError, RestoreOptions, RestoreOutcome, RestoreSummary, restore_generation,
    restore_generation_with,
};
pub use store::{S3Error, Store};
pub use upload::{
    ManifestContext, UploadError, UploadOptions, UploadSummary, upload_generation,
    upload_generation_with_progress,
};

/// A setting that is wrong in a way parsing could not see (a missing directory, say): the
/// process exits 64, like a bad flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
