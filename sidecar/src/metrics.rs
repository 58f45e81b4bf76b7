//! Metric names of `nerve-sidecar run` (prefix `nerve_sidecar_`), documented in
//! docs/sidecar-run.md. The transfer metrics are the store crate's
//! ([`nerve_store::metrics`]).
//!
//! Recorded through the `metrics` facade; the `run` command's Prometheus endpoint exports them.

// `run`: from notice to committed checkpoint.

/// Notices acted on, by `kind` and the `channel` they came through (`agent`, `metadata`,
/// `sigterm`).
pub const NOTICES: &str = "nerve_sidecar_notices_total";
/// From hearing a notice to the signal sent to the trainer, by the `channel` it came through
/// (`peer` for another pod's notice: from its detection, on that node's clock).
pub const NOTICE_TO_SIGNAL: &str = "nerve_sidecar_notice_to_signal_seconds";
/// Polls of the job-wide notice by `outcome`: `absent`, `unchanged`, `notice`, `own`, `stale`,
/// `error` (multi-pod jobs).
pub const PEER_POLLS: &str = "nerve_sidecar_peer_polls_total";
/// Other pods' notices seen, by `outcome`: `taken` or `stale`.
pub const PEER_NOTICES: &str = "nerve_sidecar_peer_notices_total";
/// This rank's parts committed for a notice, by `timing`: `before` or `after` the deadline of
/// the node that received it (a rank whose node stays commits after it, so the generation
/// completes).
pub const PARTS: &str = "nerve_sidecar_parts_total";
/// Signals by `outcome`: `sent` (per process) or `no-handler` (no process handles the signal).
pub const SIGNALS: &str = "nerve_sidecar_signals_total";
/// From the signal to the checkpoint being complete (marker or quiet period) or cut off.
pub const CHECKPOINT_WAIT: &str = "nerve_sidecar_checkpoint_wait_seconds";
/// Notice checkpoints by `outcome`: `committed`, `cut-off` (not complete in time), `failed`.
pub const CHECKPOINTS: &str = "nerve_sidecar_checkpoints_total";
/// From hearing a notice to its checkpoint's manifest committed: time to safe.
pub const TIME_TO_SAFE: &str = "nerve_sidecar_time_to_safe_seconds";
/// Time left before the deadline when the last notice checkpoint was committed.
pub const DEADLINE_MARGIN: &str = "nerve_sidecar_deadline_margin_seconds";
/// Time left before the current notice's deadline, while waiting for the checkpoint.
pub const DEADLINE_TIME_LEFT: &str = "nerve_sidecar_deadline_time_left_seconds";
/// Expected time to upload what is not yet in the store, at the measured throughput.
pub const EXPECTED_UPLOAD: &str = "nerve_sidecar_expected_upload_seconds";
/// How long the directory has held a checkpoint not yet in the store (0 when in sync).
pub const BACKGROUND_SYNC_LAG: &str = "nerve_sidecar_background_sync_lag_seconds";
/// Background syncs by `outcome`: `committed`, `preempted` (by a notice), `failed`.
pub const BACKGROUND_SYNCS: &str = "nerve_sidecar_background_syncs_total";
