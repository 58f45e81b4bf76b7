//! The command line: one subcommand per job the sidecar does. Each subcommand's flags live with
//! the module that does the job (`transfer`, `run`, `inject`), the shared ones in `settings`;
//! this module only puts them together, so no module below it imports it.

use clap::{Parser, Subcommand, ValueEnum};

use crate::inject::{InjectArgs, WebhookArgs};
use crate::run::RunArgs;
use crate::transfer::{ListArgs, PruneArgs, RestoreArgs, UploadArgs};

/// Exit code for a configuration error (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "nerve-sidecar", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format: human text or one JSON object per line. Level comes from RUST_LOG.
    #[arg(long, env = "NERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload the checkpoint directory once as a new generation and commit it.
    Upload(UploadArgs),
    /// The long-running sidecar: on a notice, signal the trainer and commit its checkpoint.
    Run(Box<RunArgs>),
    /// Put the latest committed generation (or --generation) into the directory.
    Restore(RestoreArgs),
    /// List committed generations of a job, oldest first.
    List(ListArgs),
    /// Delete generations beyond the newest N and objects nothing references.
    Prune(PruneArgs),
    /// Add the checkpoint sidecar to the pod templates in manifests (printed on stdout).
    Inject(InjectArgs),
    /// Serve sidecar injection as a Kubernetes mutating admission webhook over HTTPS.
    Webhook(WebhookArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_flags_parse_with_defaults() {
        let cli = Cli::try_parse_from([
            "nerve-sidecar",
            "upload",
            "--dir",
            "/ckpt",
            "--dest",
            "s3://bucket/some/prefix",
            "--job",
            "llama-7b",
        ])
        .expect("valid flags");
        let Command::Upload(args) = cli.command else {
            panic!("expected upload")
        };
        assert_eq!(
            args.checkpoint.transfer.concurrency,
            nerve_store::DEFAULT_CONCURRENCY
        );
        assert_eq!(
            args.checkpoint.transfer.part_size,
            nerve_store::DEFAULT_PART_SIZE
        );
        assert_eq!(args.checkpoint.store.dest.bucket, "bucket");
        assert_eq!(args.checkpoint.store.dest.prefix, "some/prefix");
        assert_eq!(
            args.checkpoint.store.checksum,
            nerve_store::ChecksumMode::Crc32c
        );
    }
}
