//! Listing committed generations.

use crate::cli::ListArgs;
use crate::generation::Generation;
use crate::store::{S3Error, Store};

pub async fn list_generations(_store: &Store) -> Result<Vec<Generation>, S3Error> {
    Ok(Vec::new())
}

pub async fn command(_args: ListArgs) -> anyhow::Result<()> {
    anyhow::bail!("list is being built")
}
