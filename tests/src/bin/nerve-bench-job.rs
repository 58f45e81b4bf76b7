//! The multi-pod figures (issues 11 and 16): a job of `--ranks` pods on as many simulated nodes
//! (a metadata simulator and a real agent each), one S3 server, the real release binaries. A
//! Spot notice is set in one node's metadata simulator; the sidecar there publishes it, the
//! others learn it from the store (`peer`) or from their trainer's agreed save (`marker`).
//!
//! Two measurements:
//! - notice on one node → SIGUSR1 on every other rank, over `--trials` fresh jobs with a small
//!   state (the node that gets the notice rotates), timed by when the bench reads each trainer's
//!   `signal` line, from the moment the notice is set. Two series: trainers that agree on the
//!   step to save (whichever channel is first, the store or the agreed save's marker, brings the
//!   notice), and trainers outside any agreement, which only the store's job-wide notice reaches;
//! - notice on one rank → job manifest committed for `--ranks` × `--size` (4 × 512 MiB): wall
//!   time, and each sidecar's CPU seconds (utime + stime of /proc/PID/stat, before and after).
//!
//! Each notice is set at a random moment (a uniform wait within one peer poll after the pods are
//! ready), as a real one falls anywhere in the agents' and sidecars' poll cycles.
//!
//! The test trainer prints `signal` when its loop takes the signal: while it writes a checkpoint
//! that is only after the write, so each rank's sidecar is also timed by when it logged hearing
//! the notice.
//!
//! Run by `bench/job`. Prints one JSON object per run and Markdown tables, then the targets met
//! and missed and the results that must hold (every rank saved the same step, the job manifest
//! names every part, inside the notice window); a result that does not hold exits 1.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use nerve_tests::pod::{Job, Nodes, STARTUP_TIMEOUT, Tuning, try_start_sidecar};
use nerve_tests::process::Proc;
use serde_json::{Value, json};

/// The notice window (AWS Spot: two minutes). A generation not committed inside it is lost: a
/// wrong result, not a missed target; it also bounds every wait after the notice.
const WINDOW: Duration = Duration::from_secs(120);
/// Target (issue 11): every other rank is signalled within one peer poll plus this.
const PEER_SIGNAL_SLACK: Duration = Duration::from_millis(500);
/// The trainers' done marker, given to trainers and sidecars alike.
const DONE_MARKER: &str = "DONE";

#[derive(Debug, Parser)]
#[command(name = "nerve-bench-job")]
struct Args {
    /// Pods of the job, one per simulated node.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=16))]
    ranks: u32,
    /// Jobs started for the notice → signal figure.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Training state per rank in those trials: small, they time the signal, not the upload.
    #[arg(long, default_value = "16MiB")]
    trial_size: String,
    /// Training state per rank of the notice → job manifest run.
    #[arg(long, default_value = "512MiB")]
    size: String,
    /// Jobs started for the notice → job manifest figure.
    #[arg(long, default_value_t = 1)]
    commit_runs: usize,
    /// `--peer-poll` of every sidecar (the product default).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    peer_poll: Duration,
    /// The agents' metadata poll interval (the product default).
    #[arg(long, default_value = "1s")]
    poll_interval: String,
    /// Time of one training step of the test trainer (its default).
    #[arg(long, default_value = "20ms")]
    step_time: String,
}

/// The trainers of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trainers {
    /// Ranks of one job that agree on the step to save (a MAX all-reduce at step boundaries).
    Agreeing,
    /// Each trainer on its own: only the job-wide notice in the store reaches the other pods,
    /// and each saves its own step (so no job manifest is expected).
    Independent,
}

impl Trainers {
    fn describe(self) -> &'static str {
        match self {
            Trainers::Agreeing => "trainers agreeing on the step",
            Trainers::Independent => {
                "trainers outside any agreement (only the store carries the notice)"
            }
        }
    }
}

/// What one rank did after the notice; times are from the moment the notice was set.
#[derive(Debug, Default)]
struct RankRun {
    rank: u32,
    /// How its sidecar heard the notice: `agent` (its node's), `peer`, `marker`.
    channel: Option<String>,
    /// When its sidecar logged hearing it.
    heard: Option<Duration>,
    signal: Option<Duration>,
    /// The trainer had already saved for this notice when the signal came (the agreement first).
    already_answered: bool,
    saved_step: Option<u64>,
    save_seconds: f64,
    part_committed: Option<Duration>,
    upload_seconds: f64,
    bytes_uploaded: u64,
    /// The sidecar's CPU seconds from just before the notice to the end of the run.
    cpu_seconds: f64,
}

/// One job run: a notice on node `noticed`.
#[derive(Debug, Default)]
struct JobRun {
    noticed: u32,
    ranks: Vec<RankRun>,
    step: Option<u64>,
    job_committed: Option<Duration>,
    /// What went wrong, in words; empty when every result holds.
    wrong: Vec<String>,
}

impl JobRun {
    /// Notice → SIGUSR1 on the last of the other ranks.
    fn others_signalled(&self) -> Option<Duration> {
        self.others().map(|r| r.signal).max().flatten()
    }

    /// The noticed rank's own trainer signalled → every other rank's: how long the notice took
    /// from the node that got it to the rest of the job, without that node's metadata poll.
    fn others_after_own(&self) -> Option<Duration> {
        let own = self.ranks.get(self.noticed as usize)?.signal?;
        Some(self.others_signalled()?.saturating_sub(own))
    }

    /// Notice → the last of the other ranks' sidecars heard it.
    fn others_heard(&self) -> Option<Duration> {
        self.others().map(|r| r.heard).max().flatten()
    }

    fn others(&self) -> impl Iterator<Item = &RankRun> {
        self.ranks.iter().filter(|r| r.rank != self.noticed)
    }

    fn to_json(&self) -> Value {
        let ranks: Vec<Value> = self
            .ranks
            .iter()
            .map(|r| {
                json!({"rank": r.rank, "channel": r.channel, "heard_ms": ms(r.heard),
                "signal_ms": ms(r.signal),
                "already_answered": r.already_answered, "saved_step": r.saved_step,
                "save_seconds": r.save_seconds, "part_committed_ms": ms(r.part_committed),
                "upload_seconds": r.upload_seconds, "bytes_uploaded": r.bytes_uploaded,
                "sidecar_cpu_seconds": r.cpu_seconds})
            })
            .collect();
        json!({"noticed_rank": self.noticed, "step": self.step,
            "job_committed_ms": ms(self.job_committed), "ranks": ranks, "wrong": self.wrong})
    }
}

fn ms(at: Option<Duration>) -> Option<f64> {
    at.map(|d| d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("load average at start (1, 5, 15 min): {}", load_average());
    let mut series = Vec::new();
    for trainers in [Trainers::Agreeing, Trainers::Independent] {
        let mut trials = Vec::with_capacity(args.trials);
        for trial in 0..args.trials {
            let noticed = u32::try_from(trial).unwrap_or(0) % args.ranks;
            let name = format!("{trainers:?}-{trial}").to_lowercase();
            let run = run_job(&args, &args.trial_size, noticed, &name, trainers)?;
            println!(
                "{}",
                json!({"trainers": format!("{trainers:?}"), "trial": trial, "run": run.to_json()})
            );
            trials.push(run);
        }
        series.push((trainers, trials));
    }
    let mut commits = Vec::with_capacity(args.commit_runs);
    for index in 0..args.commit_runs {
        let name = format!("commit-{index}");
        let run = run_job(&args, &args.size, args.ranks - 1, &name, Trainers::Agreeing)?;
        println!("{}", json!({"commit_run": index, "run": run.to_json()}));
        commits.push(run);
    }
    println!("load average at end (1, 5, 15 min): {}", load_average());
    println!();
    for (trainers, trials) in &series {
        print_signal_table(&args, *trainers, trials);
    }
    print_commit_table(&args, &commits);
    judge(&args, &series, &commits)
}

/// The first three fields of /proc/loadavg: how busy the machine was around the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Starts a job of `--ranks` pods with `size` of state each, sets a notice on node `noticed`,
/// and records what every rank did until its part (and, with agreeing trainers, the job
/// manifest) is committed.
fn run_job(
    args: &Args,
    size: &str,
    noticed: u32,
    name: &str,
    kind: Trainers,
) -> anyhow::Result<JobRun> {
    let tuning = tuning(args, size);
    let job = Job::try_new(name, args.ranks, tuning.clone())?;
    let nodes = Nodes::try_start(args.ranks as usize, &tuning.agent)?;
    let mut trainers = Vec::new();
    for rank in 0..args.ranks {
        let extra = ["--done-marker", DONE_MARKER];
        let mut command = match kind {
            Trainers::Agreeing => job.trainer_command(rank, &extra),
            Trainers::Independent => job.rig.trainer_command(&job.dir(rank), &extra),
        };
        trainers.push(Proc::try_spawn("nerve-trainer", &mut command)?);
    }
    for trainer in &trainers {
        trainer.try_event("started", STARTUP_TIMEOUT)?;
    }
    let mut sidecars = Vec::new();
    for (rank, node) in (0..args.ranks).zip(&nodes.nodes) {
        let sidecar = try_start_sidecar(&mut job.run_command(rank, node, &[]))?;
        sidecar.try_log("following the agent's notice stream", STARTUP_TIMEOUT)?;
        sidecars.push(sidecar);
    }
    // A notice comes at any moment of the polls' cycles, not a fixed time after the pods
    // started: without this wait every trial would catch the sidecars' first store poll at the
    // same phase.
    std::thread::sleep(args.peer_poll.mul_f64(rand::random_range(0.0..1.0)));
    let cpu_before = sidecars
        .iter()
        .map(Proc::cpu_seconds)
        .collect::<anyhow::Result<Vec<f64>>>()?;

    let deadline = time::OffsetDateTime::now_utc() + WINDOW;
    let notice_set = Instant::now();
    nodes.simulators[noticed as usize].set_spot_interruption("terminate", deadline);
    let mut run = JobRun {
        noticed,
        ..JobRun::default()
    };
    for (rank, (trainer, sidecar)) in (0..args.ranks).zip(trainers.iter().zip(&sidecars)) {
        let seen = observe_rank(rank, trainer, sidecar, notice_set, &mut run.wrong);
        run.ranks.push(seen);
    }
    match kind {
        Trainers::Agreeing => wait_job_manifest(&job, &mut run, notice_set),
        Trainers::Independent => check_heard_from_the_store(&mut run),
    }
    for (rank, (sidecar, before)) in run.ranks.iter_mut().zip(sidecars.iter().zip(cpu_before)) {
        rank.cpu_seconds = sidecar.cpu_seconds()? - before;
    }
    Ok(run)
}

/// The flags of this benchmark's pods: `size` of state in `--step-time` steps; sidecars at the
/// product defaults but for `--peer-poll` and the done marker; agents polling every
/// `--poll-interval`.
fn tuning(args: &Args, size: &str) -> Tuning {
    let peer_poll = format!("{}ms", args.peer_poll.as_millis());
    let flags = |flags: &[&str]| flags.iter().map(|f| (*f).to_owned()).collect();
    Tuning {
        trainer: flags(&["--size", size, "--step-time", &args.step_time]),
        sidecar: flags(&["--peer-poll", &peer_poll, "--done-marker", DONE_MARKER]),
        agent: flags(&["--poll-interval", &args.poll_interval]),
    }
}

/// What rank `rank`'s trainer and sidecar printed after the notice, waited for until the end of
/// the notice window; a wait that fails is a wrong result, recorded in `wrong`.
fn observe_rank(
    rank: u32,
    trainer: &Proc,
    sidecar: &Proc,
    notice_set: Instant,
    wrong: &mut Vec<String>,
) -> RankRun {
    let since = |at: Instant| at.saturating_duration_since(notice_set);
    let until = notice_set + WINDOW;
    let left = || until.saturating_duration_since(Instant::now());
    let mut figures = RankRun {
        rank,
        ..RankRun::default()
    };
    let mut check = |result: anyhow::Result<(Instant, Value)>| match result {
        Ok(found) => Some(found),
        Err(error) => {
            wrong.push(format!("rank {rank}: {error:#}"));
            None
        }
    };
    if let Some((at, signal)) = check(trainer.try_event("signal", left())) {
        figures.signal = Some(since(at));
        figures.already_answered = signal["already_answered"] == true;
    }
    if let Some((_, saved)) = check(
        trainer.try_wait_json("the notice's checkpoint", left(), |v| {
            v["event"] == "checkpoint" && (v["reason"] == "signal" || v["reason"] == "peer")
        }),
    ) {
        figures.saved_step = saved["step"].as_u64();
        figures.save_seconds = saved["seconds"].as_f64().unwrap_or_default();
    }
    let heard = sidecar.try_wait_json("the notice", left(), |v| {
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        message == "notice" || message == "notice from another pod of the job"
    });
    if let Some((at, heard)) = check(heard) {
        figures.heard = Some(since(at));
        figures.channel = heard["fields"]["channel"].as_str().map(str::to_owned);
    }
    if let Some((at, committed)) = check(sidecar.try_log("checkpoint committed", left())) {
        figures.part_committed = Some(since(at));
        figures.upload_seconds = committed["fields"]["upload_seconds"]
            .as_f64()
            .unwrap_or(0.0);
        figures.bytes_uploaded = committed["fields"]["bytes_uploaded"].as_u64().unwrap_or(0);
    }
    figures
}

/// Trainers outside any agreement: every other rank must have heard the notice from the store.
fn check_heard_from_the_store(run: &mut JobRun) {
    let noticed = run.noticed;
    for rank in run.ranks.iter().filter(|r| r.rank != noticed) {
        if rank.channel.as_deref() != Some("peer") {
            run.wrong.push(format!(
                "rank {} heard the notice by {:?}, not from the store",
                rank.rank, rank.channel
            ));
        }
    }
}

/// Waits (inside the window) for the job manifest of the step every rank saved, and checks it
/// names one part per rank.
fn wait_job_manifest(job: &Job, run: &mut JobRun, notice_set: Instant) {
    let steps: Vec<Option<u64>> = run.ranks.iter().map(|r| r.saved_step).collect();
    let Some(Some(step)) = steps.first().copied() else {
        run.wrong.push("no rank saved for the notice".to_owned());
        return;
    };
    if steps.iter().any(|s| *s != Some(step)) {
        run.wrong
            .push(format!("the ranks saved different steps: {steps:?}"));
        return;
    }
    run.step = Some(step);
    let until = notice_set + WINDOW;
    let manifest = loop {
        if let Some(manifest) = job.job_manifest(step) {
            run.job_committed = Some(notice_set.elapsed());
            break manifest;
        }
        if Instant::now() >= until {
            run.wrong.push(format!(
                "the job manifest of step {step} was not committed inside the {} s window (parts of ranks {:?})",
                WINDOW.as_secs(),
                job.parts(step)
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let parts: Vec<u64> = manifest["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["rank"].as_u64()).collect())
        .unwrap_or_default();
    let expected: Vec<u64> = (0..u64::from(job.world)).collect();
    if manifest["world_size"] != job.world || parts != expected || manifest["step"] != step {
        run.wrong.push(format!(
            "the job manifest does not name one part per rank at step {step}: {manifest}"
        ));
    }
}

/// The middle sample (the mean of the two middle ones for an even count).
fn median(mut samples: Vec<Duration>) -> Option<Duration> {
    samples.sort();
    let upper = *samples.get(samples.len() / 2)?;
    if samples.len() % 2 == 1 {
        return Some(upper);
    }
    Some((samples[samples.len() / 2 - 1] + upper) / 2)
}

fn seconds(at: Option<Duration>) -> String {
    at.map_or_else(|| "-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// Notice → signal of every other rank, per trial, and by channel.
fn print_signal_table(args: &Args, trainers: Trainers, trials: &[JobRun]) {
    println!(
        "notice on one node -> SIGUSR1 on every other rank, {} ({} ranks, {} of state each, peer poll {}, agent poll {}, trainer step {}):",
        trainers.describe(),
        args.ranks,
        args.trial_size,
        humantime::format_duration(args.peer_poll),
        args.poll_interval,
        args.step_time
    );
    println!();
    println!(
        "| trial | notice on rank | its trainer signalled | every other sidecar heard | every other trainer signalled | of which after the noticed rank's | channels of the others |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (index, run) in trials.iter().enumerate() {
        let own = run.ranks.get(run.noticed as usize).and_then(|r| r.signal);
        println!(
            "| {index} | {} | {} | {} | {} | {} | {} |",
            run.noticed,
            seconds(own),
            seconds(run.others_heard()),
            seconds(run.others_signalled()),
            seconds(run.others_after_own()),
            channels(run)
        );
    }
    println!();
}

/// `peer ×2, marker ×1` for the ranks that did not get the notice themselves.
fn channels(run: &JobRun) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for rank in run.ranks.iter().filter(|r| r.rank != run.noticed) {
        let channel = rank.channel.clone().unwrap_or_else(|| "none".to_owned());
        match counts.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, n)) => *n += 1,
            None => counts.push((channel, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
    parts.join(", ")
}

/// Notice → job manifest: per rank of each commit run.
fn print_commit_table(args: &Args, commits: &[JobRun]) {
    println!(
        "notice on rank {} -> job manifest committed ({} ranks × {}):",
        args.ranks - 1,
        args.ranks,
        args.size
    );
    println!();
    println!(
        "| run | rank | heard by | heard | signalled | trainer save | part committed | upload | uploaded | sidecar CPU | job manifest |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (index, run) in commits.iter().enumerate() {
        for rank in &run.ranks {
            println!(
                "| {index} | {} | {} | {} | {} | {:.1} s | {} | {:.1} s | {:.0} MiB | {:.2} s | {} |",
                rank.rank,
                rank.channel.as_deref().unwrap_or("-"),
                seconds(rank.heard),
                seconds(rank.signal),
                rank.save_seconds,
                seconds(rank.part_committed),
                rank.upload_seconds,
                rank.bytes_uploaded as f64 / (1024.0 * 1024.0),
                rank.cpu_seconds,
                seconds(run.job_committed)
            );
        }
    }
    println!();
}

/// Prints the targets met and missed and the results that must hold; an error when one does
/// not.
fn judge(
    args: &Args,
    series: &[(Trainers, Vec<JobRun>)],
    commits: &[JobRun],
) -> anyhow::Result<()> {
    println!("targets (issue 11):");
    let mut judged = 0;
    let mut missed = 0;
    for (trainers, trials) in series {
        for met in judge_signals(args, *trainers, trials) {
            judged += 1;
            missed += usize::from(!met);
        }
    }
    println!(
        "for reference, not a target: the same from the noticed rank's own signal (without its node's metadata poll):"
    );
    for (trainers, trials) in series {
        let samples: Vec<Duration> = trials.iter().filter_map(JobRun::others_after_own).collect();
        println!(
            "         {}: median {}, max {}",
            trainers.describe(),
            seconds(median(samples.clone())),
            seconds(samples.iter().max().copied())
        );
    }
    println!("results that must hold:");
    let mut wrong = Vec::new();
    let runs = series.iter().flat_map(|(trainers, trials)| {
        let label = move |i| format!("{trainers:?} trial {i}").to_lowercase();
        trials.iter().enumerate().map(move |(i, r)| (label(i), r))
    });
    let commit_runs = commits
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("commit run {i}"), r));
    for (label, run) in runs.chain(commit_runs) {
        if !run.wrong.is_empty() {
            println!("  WRONG  {label}: {}", run.wrong.join("; "));
            wrong.push(label);
        } else if let Some(step) = run.step {
            println!(
                "  ok     {label}: every rank saved step {step}, job manifest of {} parts committed {} after the notice (window {} s)",
                run.ranks.len(),
                seconds(run.job_committed),
                WINDOW.as_secs()
            );
        } else {
            println!(
                "  ok     {label}: every other rank heard the notice from the store and committed its part"
            );
        }
    }
    let met = judged - missed;
    if wrong.is_empty() {
        println!("result: {met} targets met, {missed} missed; every result holds");
        Ok(())
    } else {
        println!("result: {met} targets met, {missed} missed; WRONG RESULT");
        bail!("wrong result in {}", wrong.join(", "))
    }
}

/// The median and max of notice → SIGUSR1 on every other rank against one peer poll plus the
/// slack; whether each was met.
fn judge_signals(args: &Args, trainers: Trainers, trials: &[JobRun]) -> [bool; 2] {
    let target = args.peer_poll + PEER_SIGNAL_SLACK;
    let samples: Vec<Duration> = trials.iter().filter_map(JobRun::others_signalled).collect();
    let every_trial = samples.len() == trials.len();
    let figures = [
        ("median", median(samples.clone())),
        ("max", samples.iter().max().copied()),
    ];
    figures.map(|(what, figure)| {
        let met = every_trial && figure.is_some_and(|f| f <= target);
        println!(
            "  {} {}: notice on one node -> SIGUSR1 on every other rank, {what} over {} trials {} (target <= peer poll + {} ms = {:.1} s)",
            if met { "met   " } else { "MISSED" },
            trainers.describe(),
            trials.len(),
            seconds(figure),
            PEER_SIGNAL_SLACK.as_millis(),
            target.as_secs_f64()
        );
        met
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_sample_or_the_mean_of_the_two_middle_ones() {
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(median(vec![ms(30), ms(10), ms(20)]), Some(ms(20)));
        assert_eq!(median(vec![ms(40), ms(10), ms(20), ms(30)]), Some(ms(25)));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn channels_count_only_the_ranks_that_did_not_get_the_notice() {
        let rank = |rank, channel: &str| RankRun {
            rank,
            channel: Some(channel.to_owned()),
            ..RankRun::default()
        };
        let run = JobRun {
            noticed: 1,
            ranks: vec![
                rank(0, "marker"),
                rank(1, "agent"),
                rank(2, "marker"),
                rank(3, "peer"),
            ],
            ..JobRun::default()
        };
        assert_eq!(channels(&run), "marker ×2, peer ×1");
    }
}
