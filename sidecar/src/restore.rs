//! Restoring a committed generation into the checkpoint directory.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::cli::RestoreArgs;
use crate::generation::Generation;
use crate::store::Store;

#[derive(Debug)]
pub enum RestoreOutcome {
    Nothing,
    Restored { generation: Generation },
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("restore cancelled")]
    Cancelled,
}

pub async fn restore_generation(
    _store: &Store,
    _dir: &Path,
    _generation: Option<Generation>,
) -> Result<RestoreOutcome, RestoreError> {
    Err(RestoreError::Cancelled)
}

pub async fn command(_args: RestoreArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("restore is being built")
}
