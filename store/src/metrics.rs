//! Metric names of the checkpoint store (prefix `nerve_sidecar_`, the process that exports
//! them), documented in docs/transfer.md.
//!
//! Recorded through the `metrics` facade; whoever installs a recorder (the sidecar's `run`
//! command and its Prometheus endpoint) exports them. Without one, recording is free.

/// Bytes sent to the store, by `direction` (`upload`, `download`).
pub const TRANSFER_BYTES: &str = "nerve_sidecar_transfer_bytes_total";
/// Bytes of files left out of an upload because the previous generation already holds them.
pub const REUSED_BYTES: &str = "nerve_sidecar_reused_bytes_total";
/// Requests to the store that failed and were retried by us (whole parts or objects), by
/// `operation`.
pub const RETRIES: &str = "nerve_sidecar_retries_total";
/// Generations committed (`outcome=committed`) or abandoned (`outcome=failed`).
pub const UPLOADS: &str = "nerve_sidecar_uploads_total";
/// Wall time of a whole generation upload, manifest included.
pub const UPLOAD_DURATION: &str = "nerve_sidecar_upload_duration_seconds";
/// Restores by `outcome` (`restored`, `nothing`, `failed`).
pub const RESTORES: &str = "nerve_sidecar_restores_total";
/// Wall time of a whole restore.
pub const RESTORE_DURATION: &str = "nerve_sidecar_restore_duration_seconds";
