//! The settings every checkpoint-moving command shares (`run`, `upload`, `restore`, and the
//! store part for `list` and `prune`): where the checkpoint lives (`--dir`), what in it is the
//! checkpoint, where it goes (`--dest`, `--job`), the pod's rank in a multi-pod job, and how to
//! move it.
//!
//! Every flag also reads an environment variable (the pod spec sets them), and every default is
//! visible in `--help`. Values are checked while parsing, so a bad setting exits 64 before any
//! work starts.

use std::path::{Path, PathBuf};

use clap::{ArgAction, Args};

use crate::rank::detect_rank;

use nerve_store::exclude::Excludes;
use nerve_store::part::Rank;
use nerve_store::step::{DEFAULT_STEP_PATTERN, StepPattern};
use nerve_store::{
    ChecksumMode, DEFAULT_CONCURRENCY, Destination, MAX_CONCURRENCY, MAX_PART_SIZE, MIN_PART_SIZE,
    StoreConfig,
};

const MIB: u64 = 1024 * 1024;

/// Where checkpoints of a job live in object storage.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Bucket and prefix, e.g. s3://my-bucket/checkpoints. Endpoint, region and credentials come
    /// from the AWS SDK chain (AWS_ENDPOINT_URL, AWS_REGION, IRSA, instance profile, ...).
    #[arg(long, env = "NERVE_DEST", value_parser = Destination::parse)]
    pub dest: Destination,

    /// Stable name of the training job across pods; generations live under <prefix>/<job>/.
    #[arg(long, env = "NERVE_JOB", value_parser = nerve_store::s3::check_job_name)]
    pub job: String,

    /// Address the bucket in the path (http://host/bucket/key) instead of the host name; most
    /// S3-compatible stores (MinIO, Ceph, s3s) need this.
    #[arg(long, env = "NERVE_PATH_STYLE")]
    pub path_style: bool,

    /// Checksum sent with every object and part for the store to verify. `crc32c` works with
    /// AWS and stores that accept x-amz-checksum-crc32c headers; `none` for stores that reject
    /// them. The manifest always records CRC32C per file, and restore always verifies it.
    #[arg(long, env = "NERVE_CHECKSUM", default_value = "crc32c", value_parser = parse_checksum())]
    pub checksum: ChecksumMode,
}

impl StoreArgs {
    /// The store crate's view of these flags.
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            dest: self.dest.clone(),
            job: self.job.clone(),
            path_style: self.path_style,
            checksum: self.checksum,
        }
    }
}

fn parse_checksum() -> impl clap::builder::TypedValueParser<Value = ChecksumMode> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(ChecksumMode::NAMES)
        .map(|name| name.parse().unwrap_or(ChecksumMode::Crc32c))
}

/// How hard to push a transfer.
#[derive(Debug, Clone, Args)]
pub struct TransferArgs {
    /// Requests in flight at once, across all files and parts; small files (up to 256 KiB) get
    /// up to 4 times as many of their own (their cost is a round trip, not a core).
    #[arg(long, env = "NERVE_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY,
          value_parser = parse_concurrency)]
    pub concurrency: usize,

    /// Multipart part size (e.g. 32MiB, at least 5MiB); grows for files that would need more
    /// than 10,000 parts.
    #[arg(long, env = "NERVE_PART_SIZE", default_value = "32MiB", value_parser = parse_part_size)]
    pub part_size: u64,
}

/// The flags every checkpoint-moving command shares: the directory, the store, the tuning.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// The checkpoint directory the trainer writes and reads.
    #[arg(long, env = "NERVE_CHECKPOINT_DIR")]
    pub dir: PathBuf,

    #[command(flatten)]
    pub content: ContentArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub rank: RankArgs,

    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// A pod's place in a multi-pod job.
#[derive(Debug, Clone, Args)]
pub struct RankArgs {
    /// This pod's rank in a multi-pod job, from 0 [default: PET_NODE_RANK, GROUP_RANK or
    /// JOB_COMPLETION_INDEX; see docs/DESIGN.md].
    #[arg(long, env = "NERVE_RANK")]
    pub rank: Option<u32>,

    /// Pods in the job; above 1, each uploads its part of one generation per step [default:
    /// PET_NNODES or GROUP_WORLD_SIZE; otherwise 1].
    #[arg(long, env = "NERVE_WORLD_SIZE")]
    pub world_size: Option<u32>,
}

impl RankArgs {
    /// The rank, from the flags or the pod's environment.
    pub fn resolve(&self) -> Result<Rank, crate::ConfigError> {
        let (rank, source) =
            detect_rank(self.rank, self.world_size, &|name| std::env::var(name).ok())
                .map_err(crate::ConfigError)?;
        if rank.is_multi_pod() {
            tracing::info!(
                rank = rank.rank,
                world_size = rank.world_size,
                source = source.as_str(),
                "multi-pod job"
            );
        }
        Ok(rank)
    }
}

/// The done marker's name when `--done-marker` is not given, inside `--dir`; the Nerve trainer
/// integrations write it there too, so both agree without configuration.
pub const DEFAULT_DONE_MARKER: &str = ".nerve-done";

/// What under the directory is the checkpoint, when it is complete and which step it holds.
#[derive(Debug, Clone, Args)]
pub struct ContentArgs {
    /// Glob (relative to --dir) of paths that are not checkpoint content: left out of
    /// completion, upload and restore. Repeatable; the variable takes a comma-separated list.
    /// Added to the defaults (see --default-excludes).
    #[arg(long = "exclude", env = "NERVE_EXCLUDE", value_delimiter = ',',
          value_parser = parse_exclude)]
    pub exclude: Vec<String>,

    /// Also exclude what trainers log beside their checkpoints: **/events.out.tfevents.*,
    /// runs/**, lightning_logs/**/events.*, wandb/**, **/*.log.
    #[arg(long, env = "NERVE_DEFAULT_EXCLUDES", default_value_t = true, action = ArgAction::Set)]
    pub default_excludes: bool,

    /// File (relative to --dir, or absolute) the trainer writes when a checkpoint is complete,
    /// with `step=N` (and `reason=notice` when it answers a notice) [default: .nerve-done].
    /// When given, a notice waits for it; by default it is one sign of completion among others.
    #[arg(long, env = "NERVE_DONE_MARKER")]
    pub done_marker: Option<PathBuf>,

    /// Regex naming step checkpoints; its first matching capture group is the step.
    #[arg(long, env = "NERVE_STEP_FROM", default_value = DEFAULT_STEP_PATTERN,
          value_parser = StepPattern::parse)]
    pub step_from: StepPattern,
}

impl ContentArgs {
    /// The exclude patterns in force. The done marker is one of them: it says when and which
    /// step, it is not checkpoint content (and each rank of a job writes its own).
    pub fn excludes(&self) -> Excludes {
        let mut patterns = self.exclude.clone();
        if let Some(marker) = self.done_marker.as_deref().and_then(Path::to_str)
            && !marker.starts_with('/')
        {
            patterns.push(globset::escape(marker.trim_start_matches("./")));
        }
        // Every pattern was checked while parsing.
        Excludes::new(&patterns, self.default_excludes).unwrap_or_default()
    }

    /// Where the done marker is (given or default), for the checkpoint directory `dir`.
    pub fn marker_path(&self, dir: &Path) -> PathBuf {
        dir.join(
            self.done_marker
                .as_deref()
                .unwrap_or(Path::new(DEFAULT_DONE_MARKER)),
        )
    }
}

fn parse_exclude(value: &str) -> Result<String, String> {
    Excludes::new(&[value.to_owned()], false)
        .map(|_| value.trim().to_owned())
        .map_err(|e| e.to_string())
}

fn parse_concurrency(value: &str) -> Result<usize, String> {
    let n: usize = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number of requests"))?;
    if (1..=MAX_CONCURRENCY).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be between 1 and {MAX_CONCURRENCY}, got {n}"))
    }
}

fn parse_part_size(value: &str) -> Result<u64, String> {
    let bytes = parse_byte_size(value)?;
    if (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "must be between 5MiB and 5GiB (S3's part size limits), got {value}"
        ))
    }
}

/// Parses `16MiB`, `8M`, `1GiB`, `5242880` (binary units; `MB` means MiB too, as in most tools).
pub fn parse_byte_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{value}` is not a size; write e.g. 16MiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => 1024 * MIB,
        _ => {
            return Err(format!(
                "`{value}` has an unknown unit; use KiB, MiB or GiB"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{value}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_byte_sizes_in_binary_units() {
        assert_eq!(parse_byte_size("16MiB"), Ok(16 * MIB));
        assert_eq!(parse_byte_size("8M"), Ok(8 * MIB));
        assert_eq!(parse_byte_size("1gib"), Ok(1024 * MIB));
        assert_eq!(parse_byte_size("5242880"), Ok(5 * MIB));
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("3XB").is_err());
    }

    #[test]
    fn refuses_part_sizes_outside_s3_limits() {
        assert!(parse_part_size("4MiB").is_err());
        assert!(parse_part_size("6GiB").is_err());
        assert_eq!(parse_part_size("5MiB"), Ok(5 * MIB));
    }

    #[test]
    fn refuses_job_names_that_would_change_the_key_layout() {
        let check = nerve_store::s3::check_job_name;
        assert!(check("a/b").is_err());
        assert!(check("..").is_err());
        assert!(check("").is_err());
        assert!(check("run-2026.11_a").is_ok());
    }
}
