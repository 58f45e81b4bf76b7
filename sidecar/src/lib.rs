//! nerve-sidecar: the per-pod sidecar that gets a training job's checkpoint into object storage
//! before the machine goes away, and puts it back when the next pod starts.
//!
//! `run` decides *when* to checkpoint (a notice, SIGTERM, a completed periodic checkpoint) and
//! talks to the trainer (signals, done markers); the checkpoint store crate ([`nerve_store`])
//! moves the bytes. `inject` and `webhook` add the sidecar to pod templates.

pub mod cli;
pub mod inject;
pub mod metrics;
pub mod rank;
pub mod run;
pub mod settings;
pub mod transfer;

/// A setting that is wrong in a way parsing could not see (a missing directory, say): the
/// process exits 64, like a bad flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
