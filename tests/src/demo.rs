//! The whole interruption scenario on one machine, with real processes: the metadata simulator
//! (as a Spot instance), an S3 server, the API-server stand-in with the Node, the real
//! `nerve-agent` and `nerve-sidecar run` configured the way the Helm chart and the injector
//! configure them, and a real trainer. A Spot notice arrives; the timeline of what happened is
//! measured; then the next pod restores the checkpoint and the trainer resumes from it.
//!
//! With `ranks` above 1 it is a multi-pod job: one pod per simulated machine (a metadata
//! simulator and an agent each, one Node each in the API server), trainers that agree on the
//! step to save, sidecars with their rank. The notice arrives on the last machine only; the
//! timeline shows how every other pod learnt it, each rank's part and the job's generation
//! committed, and every rank resuming at the same step.
//!
//! Used by the `nerve-demo` binary and, headless with a small state, by the end-to-end tests.

mod children;
mod observe;
mod pods;
mod resume;
mod watch;
mod world;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::sync::mpsc;

use children::Children;
use observe::SEEN_BUFFER;
use world::World;

/// Name of the Node the stand-in serves and the agent cordons (with several ranks, `-<rank>`
/// follows).
const NODE_NAME: &str = "demo-node";
/// Bucket the embedded S3 server creates; with `--s3-endpoint` it must exist already.
pub const DEFAULT_BUCKET: &str = "nerve-demo";
/// Job name: the stable name of the training job across pods.
const JOB: &str = "demo-job";
/// The trainer's done marker, relative to the checkpoint directory (the sidecar's --done-marker).
const DONE_MARKER: &str = ".nerve-checkpoint-done";
/// Starting the agent, sidecar and trainer and seeing them ready takes well under this, even on
/// a loaded 2-core CI machine; past it something is wrong and waiting longer would only hide it.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the trainer trains before the notice, so the checkpoint is of a step > 0.
const TRAIN_BEFORE_NOTICE: Duration = Duration::from_secs(2);
/// Pod termination after the commit: the sidecar must exit 0 within this (the chart's
/// terminationGracePeriodSeconds is far longer; the sidecar has nothing left to do).
const POD_TERMINATION_GRACE: Duration = Duration::from_secs(30);
/// Most ranks the demo runs: each is a trainer, a sidecar, an agent and a metadata simulator on
/// this one machine; beyond 8 a laptop measures its own contention, not Nerve.
pub const MAX_RANKS: u32 = 8;

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Bytes of training state each trainer keeps and checkpoints.
    pub size: u64,
    /// Time from the notice to the machine going away.
    pub deadline: Duration,
    /// A real S3-compatible store instead of the embedded one (credentials from the environment).
    pub s3_endpoint: Option<String>,
    /// Bucket to use (must exist when `s3_endpoint` is given).
    pub bucket: String,
    /// Where `nerve-agent`, `nerve-sidecar` and `nerve-trainer` are.
    pub bin_dir: PathBuf,
    /// Working directory (checkpoints of both pods, logs, the embedded store).
    pub work: PathBuf,
    /// Print the timeline as it happens.
    pub print: bool,
    /// Pods of the job, one per simulated machine (1: the single-pod demo).
    pub ranks: u32,
}

/// The measured facts of one run; durations are from the moment the notice was set.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub notice_id: String,
    /// The rank whose machine got the notice (the last one).
    pub noticed_rank: usize,
    /// The agent of that machine streamed the notice.
    pub agent_saw_notice: Option<Duration>,
    pub cordoned: Option<Duration>,
    /// The taint as the API stand-in recorded it, `key=value:Effect`.
    pub taint: Option<String>,
    /// Other machines whose agent streamed a notice or whose Node was cordoned: none, rightly.
    pub disturbed_nodes: Vec<String>,
    /// Multi-pod: the noticed rank's sidecar published the notice for the job.
    pub published: Option<Duration>,
    /// The generation committed (with several ranks: its job manifest).
    pub committed: Option<Duration>,
    pub committed_generation: Option<String>,
    /// Time left before the deadline when the generation was committed.
    pub margin: Option<Duration>,
    /// Committed generations of the job after the run.
    pub generations: usize,
    pub ranks: Vec<RankTimeline>,
}

/// What one rank's pod did.
#[derive(Clone, Debug, Default)]
pub struct RankTimeline {
    pub signal_delivered: Option<Duration>,
    /// The trainer had already saved for this notice (the ranks' agreement) when signalled.
    pub already_answered: bool,
    /// Multi-pod: how this rank's sidecar learnt another pod's notice, `peer` (the job-wide
    /// notice in the store) or `marker` (its trainer's agreed save).
    pub heard_by: Option<String>,
    pub checkpoint_complete: Option<Duration>,
    /// Multi-pod: this rank's part committed.
    pub part_committed: Option<Duration>,
    pub bytes_uploaded: u64,
    pub bytes_reused: u64,
    pub upload_seconds: f64,
    pub sidecar_exit_code: Option<i32>,
    pub saved_step: Option<u64>,
    pub saved_digest: Option<String>,
    pub resumed_step: Option<u64>,
    pub resumed_digest: Option<String>,
    /// Every file of the rank's restored checkpoint equals the one its trainer wrote.
    pub files_identical: bool,
}

impl RankTimeline {
    /// Resumed at the step it saved, with the same state and the same files.
    pub fn resumed_as_saved(&self) -> bool {
        self.saved_step.is_some()
            && self.saved_step == self.resumed_step
            && self.saved_digest.is_some()
            && self.saved_digest == self.resumed_digest
            && self.files_identical
    }
}

impl Timeline {
    /// The run did what Nerve promises: the noticed machine (only) cordoned, committed in time,
    /// every rank resumed at the same step with the same state.
    pub fn succeeded(&self) -> bool {
        let first_step = self.ranks.first().and_then(|r| r.saved_step);
        self.cordoned.is_some()
            && self.disturbed_nodes.is_empty()
            && self.committed.is_some()
            && self.margin.is_some()
            && !self.ranks.is_empty()
            && self.ranks.iter().all(RankTimeline::resumed_as_saved)
            && self.ranks.iter().all(|r| r.saved_step == first_step)
    }
}

/// Runs the scenario. Every child process is stopped when this returns or is dropped.
pub async fn run_demo(options: &DemoOptions) -> anyhow::Result<Timeline> {
    let mut demo = Demo::start(options)?;
    demo.start_agents().await?;
    let (sender, mut seen) = mpsc::channel(SEEN_BUFFER);
    let pods = demo.start_pods(&sender, &mut seen).await?;
    tokio::time::sleep(TRAIN_BEFORE_NOTICE).await;
    let mut timeline = demo.watch_the_notice(&pods, &sender, &mut seen).await?;
    // From here on the children's lines only go to their logs.
    drop(seen);
    demo.machine_goes_away(&pods, &mut timeline).await?;
    demo.resume(&mut timeline).await?;
    Ok(timeline)
}

/// One run: what was asked, what it is called, the world around the pods, the processes.
struct Demo<'a> {
    options: &'a DemoOptions,
    names: Names,
    out: Printer,
    world: World,
    children: Children,
}

impl<'a> Demo<'a> {
    fn start(options: &'a DemoOptions) -> anyhow::Result<Demo<'a>> {
        ensure!(
            (1..=MAX_RANKS).contains(&options.ranks),
            "--ranks {} is not between 1 and {MAX_RANKS}",
            options.ranks
        );
        let names = Names {
            ranks: options.ranks as usize,
        };
        let out = Printer(options.print);
        let logs = options.work.join("logs");
        std::fs::create_dir_all(&logs).context("creating the log directory")?;
        let world = World::start(options, names)?;
        out.line(world.describe());
        let children = Children::new(&options.bin_dir, &logs);
        Ok(Demo {
            options,
            names,
            out,
            world,
            children,
        })
    }
}

/// What the demo calls each rank's things. With one rank: exactly the single-pod demo's names
/// and lines; with several, each carries its rank.
#[derive(Clone, Copy, Debug)]
struct Names {
    ranks: usize,
}

impl Names {
    fn multi(self) -> bool {
        self.ranks > 1
    }

    /// The rank whose machine gets the notice: the last.
    fn noticed(self) -> usize {
        self.ranks - 1
    }

    /// The Node (machine) of rank `rank`'s pod.
    fn node(self, rank: usize) -> String {
        if self.multi() {
            format!("{NODE_NAME}-{rank}")
        } else {
            NODE_NAME.to_owned()
        }
    }

    /// ` on <node>` after what runs on a machine, with several machines.
    fn on(self, rank: usize) -> String {
        if self.multi() {
            format!(" on {}", self.node(rank))
        } else {
            String::new()
        }
    }

    /// The lead of a line about rank `rank`'s pod.
    fn rank(self, rank: usize) -> String {
        if self.multi() {
            format!("rank {rank}: ")
        } else {
            String::new()
        }
    }

    /// The log of `what` (a binary, or a one-shot command) of rank `rank`.
    fn log(self, what: &str, rank: usize) -> String {
        if self.multi() {
            format!("{what}-{rank}")
        } else {
            what.to_owned()
        }
    }

    /// Checkpoint directory of rank `rank`'s pod; `generation` 1 is the interrupted pods, 2 the
    /// next ones.
    fn pod_dir(self, work: &Path, generation: u32, rank: usize) -> PathBuf {
        if self.multi() {
            work.join(format!("pod-{generation}-rank-{rank}/checkpoints"))
        } else {
            work.join(format!("pod-{generation}/checkpoints"))
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// `1.5 GiB`, `256 MiB`, `12 KiB`, `100 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Prints the timeline when asked (the binary), stays quiet in tests.
struct Printer(bool);

impl Printer {
    fn line(&self, text: String) {
        if self.0 {
            println!("{text}");
        }
    }

    fn event(&self, at: Duration, text: String) {
        if self.0 {
            println!("  +{:>7.3}s  {text}", at.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_the_largest_whole_unit() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(256 * 1024 * 1024), "256 MiB");
        assert_eq!(human_bytes(1536 * 1024 * 1024), "1.5 GiB");
    }

    #[test]
    fn regex_escape_escapes_every_metacharacter_of_a_path() {
        assert_eq!(regex_escape("/tmp/a.b+c(1)"), "/tmp/a\\.b\\+c\\(1\\)");
        assert_eq!(regex_escape("/plain/path"), "/plain/path");
    }
}
