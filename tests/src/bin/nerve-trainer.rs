//! A stand-in for a training job: advances a step counter, keeps a deterministic training state
//! of a chosen size, writes periodic checkpoints, and on SIGUSR1 writes a checkpoint in Hugging
//! Face `checkpoint-N/` layout. Started on a directory that holds checkpoints, it resumes from
//! the newest one at the same step with the same state (or fails if the state is not exact).
//!
//! Every event is one JSON object on its own stdout line, e.g.
//! `{"event":"checkpoint","reason":"signal","step":42,"path":"/d/checkpoint-42","bytes":1024,"digest":"…","seconds":0.1}`.
//! Events: `started`, `resumed`, `signal`, `checkpoint`, `done-marker`, `rotated`, `exit`.
//!
//! With `--world-size N --rank R --peers DIR` it is one rank of a multi-pod job: its files go
//! under `checkpoint-N/rank-R/`, and a signal only sets a flag that the ranks all-reduce (MAX)
//! at every step boundary, through files in DIR, so every rank saves the same step (reason
//! `signal` on the rank that was signalled, `peer` on the others) and writes its done marker
//! with `step=N`, `reason=notice` and `rank=R`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nerve_tests::collective::FileAllReduce;
use nerve_tests::trainer::{self, Part, StateShape, WriteOptions};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "nerve-trainer",
    about = "Test trainer: checkpoints on SIGUSR1, resumes exactly"
)]
struct Args {
    /// Checkpoint directory: checkpoints go to `<dir>/checkpoint-N/`; resumes from the newest.
    #[arg(long)]
    dir: PathBuf,
    /// Bytes of training state (model shards plus optimizer), e.g. `64MiB`, `2GiB`.
    #[arg(long, default_value = "16MiB", value_parser = trainer::parse_size)]
    size: u64,
    /// Number of model shards (`model-0000i-of-0000n.safetensors`), together half of `--size`.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Model shards that never change (a frozen base), so consecutive checkpoints share them.
    #[arg(long, default_value_t = 0)]
    frozen_shards: u32,
    /// Seed of the training state.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time one training step takes.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    step_time: Duration,
    /// Write a periodic checkpoint this often (off when not given).
    #[arg(long, value_parser = humantime::parse_duration)]
    period: Option<Duration>,
    /// Checkpoints kept in the directory; older ones are deleted after a new one is written.
    #[arg(long, default_value_t = 1)]
    save_total_limit: usize,
    /// File written after the checkpoint taken on the signal is complete (relative to --dir).
    #[arg(long)]
    done_marker: Option<PathBuf>,
    /// Exit 0 after the checkpoint taken on the signal.
    #[arg(long)]
    exit_after_checkpoint: bool,
    /// Do not install a SIGUSR1 handler (the default action, termination, stays in place).
    #[arg(long)]
    no_handler: bool,
    /// On the signal, start the checkpoint, keep a file open for writing and never finish.
    #[arg(long)]
    hang_on_checkpoint: bool,
    /// Pause after every MiB written, to make checkpoints slow.
    #[arg(long, value_parser = humantime::parse_duration)]
    write_pause: Option<Duration>,
    /// Take one checkpoint at the current step right after starting (the first periodic one).
    #[arg(long)]
    checkpoint_at_start: bool,
    /// Load and verify the newest checkpoint, print `resumed`, and exit.
    #[arg(long)]
    verify: bool,
    /// Keep this file (relative to --dir) open for writing for the whole run and append a line
    /// every step, as a TensorBoard or text logger does.
    #[arg(long)]
    log_open: Option<PathBuf>,
    /// Create a symbolic link at start: `NAME=TARGET` makes `<dir>/NAME` point to TARGET.
    #[arg(long, value_parser = parse_link)]
    link: Vec<(PathBuf, PathBuf)>,
    /// On the signal, write the done marker right after the checkpoint and delete older
    /// checkpoints (--save-total-limit) this long after it, instead of before it.
    #[arg(long, value_parser = humantime::parse_duration)]
    rotate_after_marker: Option<Duration>,
    /// This trainer's rank in a multi-pod job (its files go under `checkpoint-N/rank-<r>/`).
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// Ranks of the job; more than 1 needs --peers.
    #[arg(long, default_value_t = 1)]
    world_size: u32,
    /// Directory the ranks share to agree, at every step, whether any of them was asked to
    /// save (a MAX all-reduce, as torch.distributed would do it); then every rank saves that
    /// same step.
    #[arg(long)]
    peers: Option<PathBuf>,
}

fn parse_link(value: &str) -> Result<(PathBuf, PathBuf), String> {
    let (name, target) = value
        .split_once('=')
        .ok_or_else(|| format!("`{value}` is not NAME=TARGET"))?;
    Ok((PathBuf::from(name), PathBuf::from(target)))
}

/// A signal this soon after the ranks finished a save for a notice (or during it) is that same
/// notice, heard late by this rank's sidecar (a peer's notice reaches it within a poll of the
/// store): already answered.
const ANSWERED_WINDOW: Duration = Duration::from_secs(10);

fn emit(event: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop training.
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nerve-trainer: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(train(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nerve-trainer: {e:#}");
            emit(json!({"event": "error", "message": format!("{e:#}")}));
            ExitCode::FAILURE
        }
    }
}

async fn train(args: Args) -> anyhow::Result<()> {
    let shape = StateShape {
        seed: args.seed,
        size: args.size,
        shards: args.shards,
        frozen_shards: args.frozen_shards,
    };
    let part = (args.world_size > 1).then_some(Part {
        rank: args.rank,
        world_size: args.world_size,
    });
    let collective = match (&args.peers, part) {
        (Some(dir), Some(part)) => Some(FileAllReduce::new(dir, part.rank, part.world_size)?),
        (None, Some(_)) => anyhow::bail!("--world-size above 1 needs --peers"),
        _ => None,
    };
    let mut step = 0u64;
    let mut resumed_digest = None;
    if let Some((_, path)) = trainer::list_checkpoints(&args.dir)?.pop() {
        let state = tokio::task::spawn_blocking(move || trainer::load_part(&path, part)).await??;
        step = state.global_step;
        emit(
            json!({"event": "resumed", "step": step, "digest": state.digest,
            "shape": state.shape, "rank": args.rank, "pid": std::process::id()}),
        );
        resumed_digest = Some(state.digest);
        if state.shape != shape && !args.verify {
            anyhow::bail!(
                "the checkpoint's state shape {:?} differs from the flags' {:?}",
                state.shape,
                shape
            );
        }
    }
    if args.verify {
        if resumed_digest.is_none() {
            anyhow::bail!("no checkpoint under {}", args.dir.display());
        }
        return Ok(());
    }

    for (name, target) in &args.link {
        std::os::unix::fs::symlink(target, args.dir.join(name))?;
    }
    let mut log = match &args.log_open {
        Some(relative) => {
            let path = args.dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        }
        None => None,
    };
    // Installing the handler is what sets the SIGUSR1 bit in SigCgt of /proc/PID/status.
    let mut usr1 = if args.no_handler {
        None
    } else {
        Some(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::user_defined1(),
        )?)
    };
    emit(
        json!({"event": "started", "step": step, "pid": std::process::id(),
        "handler": usr1.is_some(), "dir": args.dir}),
    );

    let options = WriteOptions {
        chunk_pause: args.write_pause,
        hang: false,
    };
    if args.checkpoint_at_start {
        save(&args, &shape, step, "periodic", options, true).await?;
    }
    // A signal seen and not yet agreed on with the other ranks.
    let mut requested = false;
    // When the ranks last finished a save for a notice: a signal soon after (or taken only now,
    // having arrived during the save) is that notice arriving late through this rank's sidecar,
    // already answered. Counted from the end of the save, however long the save took.
    let mut answered: Option<tokio::time::Instant> = None;
    let mut steps = tokio::time::interval(args.step_time);
    steps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_periodic = args.period.map(|p| tokio::time::Instant::now() + p);
    loop {
        let periodic = async {
            match next_periodic {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let signalled = async {
            match usr1.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = steps.tick() => {
                step += 1;
                if let Some(log) = log.as_mut() {
                    writeln!(log, "step {step}")?;
                    log.flush()?;
                }
                if let Some(reduce) = &collective {
                    let (reduce, flag) = (reduce.clone(), u64::from(requested));
                    let agreed =
                        tokio::task::spawn_blocking(move || reduce.max(step, flag)).await?? == 1;
                    if agreed {
                        let reason = if requested { "signal" } else { "peer" };
                        requested = false;
                        if answer_request(&args, &shape, step, options, reason).await? {
                            return Ok(());
                        }
                        answered = Some(tokio::time::Instant::now());
                    }
                }
            }
            _ = periodic => {
                save(&args, &shape, step, "periodic", options, true).await?;
                next_periodic = args.period.map(|p| tokio::time::Instant::now() + p);
            }
            _ = signalled => {
                let late = answered.is_some_and(|at| at.elapsed() < ANSWERED_WINDOW);
                emit(json!({"event": "signal", "signal": "SIGUSR1", "step": step,
                    "already_answered": late}));
                // With peers the save waits for the next step boundary, where all agree.
                if collective.is_some() {
                    requested = !late;
                } else if answer_request(&args, &shape, step, options, "signal").await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Saves `step` because it was asked to (`reason`: `signal` here, `peer` for another rank's),
/// writes the done marker, rotates; true when the trainer should exit now.
async fn answer_request(
    args: &Args,
    shape: &StateShape,
    step: u64,
    options: WriteOptions,
    reason: &str,
) -> anyhow::Result<bool> {
    let options = WriteOptions {
        hang: args.hang_on_checkpoint,
        ..options
    };
    let rotate_later = args.rotate_after_marker.is_some();
    let written = save(args, shape, step, reason, options, !rotate_later).await?;
    if let Some(marker) = &args.done_marker {
        let marker = args.dir.join(marker);
        let content = format!("step={step}\nreason=notice\nrank={}\n", args.rank);
        std::fs::write(&marker, content)?;
        emit(json!({"event": "done-marker", "path": marker, "step": step}));
    }
    if let Some(delay) = args.rotate_after_marker {
        tokio::time::sleep(delay).await;
        rotate(&args.dir, args.save_total_limit, &written)?;
        emit(json!({"event": "rotated", "step": step}));
    }
    if args.exit_after_checkpoint {
        emit(json!({"event": "exit", "step": step}));
        return Ok(true);
    }
    Ok(false)
}

/// Writes the checkpoint of `step`; deletes older ones beyond the limit when `rotate_now`.
async fn save(
    args: &Args,
    shape: &StateShape,
    step: u64,
    reason: &str,
    options: WriteOptions,
    rotate_now: bool,
) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let dir = args.dir.clone();
    let shape = *shape;
    let part = (args.world_size > 1).then_some(Part {
        rank: args.rank,
        world_size: args.world_size,
    });
    let written =
        tokio::task::spawn_blocking(move || trainer::write_part(&dir, &shape, step, options, part))
            .await??;
    emit(
        json!({"event": "checkpoint", "reason": reason, "step": step,
        "path": written.path, "bytes": written.bytes, "digest": written.digest,
        "seconds": started.elapsed().as_secs_f64()}),
    );
    if rotate_now {
        rotate(&args.dir, args.save_total_limit, &written.path)?;
    }
    Ok(written.path)
}

/// Deletes the oldest checkpoints beyond `limit`, never the one just written.
fn rotate(dir: &Path, limit: usize, keep: &Path) -> std::io::Result<()> {
    let checkpoints = trainer::list_checkpoints(dir)?;
    let excess = checkpoints.len().saturating_sub(limit.max(1));
    for (_, path) in checkpoints.into_iter().take(excess) {
        if path != keep {
            std::fs::remove_dir_all(path)?;
        }
    }
    Ok(())
}
