//! `nerve-demo`: the whole interruption scenario on this machine, with real processes.
//!
//! Builds (if needed) and starts the metadata simulator, an embedded S3 server, the API-server
//! stand-in, the real nerve-agent and nerve-sidecar, and a trainer; sets a Spot notice; prints
//! the measured timeline; restores into a new "pod" and checks training resumes exactly.
//! Exit status 0 only if the resumed state is byte-identical to the state at the notice.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nerve_tests::demo::{self, DemoOptions};

#[derive(Debug, Parser)]
#[command(
    name = "nerve-demo",
    about = "Run a Spot interruption end to end on this machine"
)]
struct Args {
    /// Training state the trainer keeps and checkpoints (e.g. 256MiB, 2GiB).
    #[arg(long, default_value = "256MiB", value_parser = nerve_tests::trainer::parse_size)]
    size: u64,
    /// Time from the notice to the machine going away.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Keep the working directory (checkpoints, logs, store) and print its path.
    #[arg(long)]
    keep: bool,
    /// Use this S3-compatible endpoint instead of the embedded server; credentials and region
    /// come from the environment (AWS_ACCESS_KEY_ID, ...), the bucket must exist.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Bucket to use.
    #[arg(long, default_value = demo::DEFAULT_BUCKET)]
    bucket: String,
    /// Do not build the binaries first (they must sit next to nerve-demo).
    #[arg(long)]
    no_build: bool,
    /// Pods of one training job, each on its own simulated machine; the notice arrives on the
    /// last machine only and every pod must checkpoint the same step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(demo::MAX_RANKS)))]
    ranks: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nerve-demo: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nerve-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("nerve-demo has no parent directory")?
        .to_path_buf();
    if !args.no_build {
        build_binaries(&bin_dir).await?;
    }
    let work = tempfile::Builder::new()
        .prefix("nerve-demo-")
        .tempdir()
        .context("creating the working directory")?;
    let options = DemoOptions {
        size: args.size,
        deadline: args.deadline,
        s3_endpoint: args.s3_endpoint,
        bucket: args.bucket,
        bin_dir,
        work: work.path().to_path_buf(),
        print: true,
        ranks: args.ranks,
    };
    println!("working directory {}", work.path().display());
    // Ctrl-C drops the scenario: every child is killed (kill_on_drop) and the directory removed.
    let result = tokio::select! {
        result = demo::run_demo(&options) => Some(result),
        _ = tokio::signal::ctrl_c() => None,
    };
    let kept: Option<PathBuf> = args.keep.then(|| work.keep());
    let Some(result) = result else {
        eprintln!("interrupted: every child process stopped");
        return Ok(false);
    };
    let timeline = result?;
    println!();
    if timeline.succeeded() {
        let step = timeline.ranks[0].resumed_step.unwrap_or_default();
        let resumed = match timeline.ranks.len() {
            1 => format!("training resumed at step {step} with identical state"),
            ranks => format!("all {ranks} ranks resumed at step {step} with identical state"),
        };
        println!(
            "OK: checkpoint committed {:.1}s before the deadline; {resumed}",
            timeline.margin.unwrap_or_default().as_secs_f64(),
        );
    } else {
        println!("FAILED: see the timeline above and the logs");
    }
    if let Some(path) = kept {
        println!("kept {}", path.display());
    }
    Ok(timeline.succeeded())
}

/// `cargo run --bin nerve-demo` builds only the demo; the agent, sidecar and trainer are built
/// here, with the same profile, so the demo always runs the binaries of this checkout.
async fn build_binaries(bin_dir: &std::path::Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let release = bin_dir.ends_with("release");
    let mut command = tokio::process::Command::new(cargo);
    command.args([
        "build",
        "--bin",
        "nerve-agent",
        "--bin",
        "nerve-sidecar",
        "--bin",
        "nerve-trainer",
    ]);
    if release {
        command.arg("--release");
    }
    println!(
        "building nerve-agent, nerve-sidecar and nerve-trainer ({})",
        if release { "release" } else { "debug" }
    );
    let status = command
        .status()
        .await
        .context("running cargo build (pass --no-build to use binaries built elsewhere)")?;
    anyhow::ensure!(status.success(), "cargo build failed with {status}");
    Ok(())
}
