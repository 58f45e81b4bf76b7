//! The whole interruption scenario on one machine, with real processes: the metadata simulator
//! (as a Spot instance), an S3 server, the API-server stand-in with one Node, the real
//! `nerve-agent` and `nerve-sidecar run` configured the way the Helm chart configures them, and
//! a real trainer. A Spot notice arrives; the timeline of what happened is measured; then the
//! next pod restores the checkpoint and the trainer resumes from it.
//!
//! Used by the `nerve-demo` binary and, headless with a small state, by the end-to-end test.

mod children;
mod observe;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use time::OffsetDateTime;

use crate::apiserver::ApiServer;
use crate::imds::MetadataSimulator;
use crate::s3::S3Server;
use children::Children;

/// Name of the Node the stand-in serves and the agent cordons.
const NODE_NAME: &str = "demo-node";
/// Pod name recorded in the manifest, as the downward API would set it.
const POD_NAME: &str = "trainer-0";
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

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Bytes of training state the trainer keeps and checkpoints.
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
}

/// The measured facts of one run; durations are from the moment the notice was set.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub notice_id: String,
    pub agent_saw_notice: Option<Duration>,
    pub cordoned: Option<Duration>,
    /// The taint as the API stand-in recorded it, `key=value:Effect`.
    pub taint: Option<String>,
    pub signal_delivered: Option<Duration>,
    pub checkpoint_complete: Option<Duration>,
    pub committed: Option<Duration>,
    pub committed_generation: Option<String>,
    pub bytes_uploaded: u64,
    pub bytes_reused: u64,
    pub upload_seconds: f64,
    /// Time left before the deadline when the manifest was committed.
    pub margin: Option<Duration>,
    /// Committed generations of the job after the run.
    pub generations: usize,
    pub sidecar_exit_code: Option<i32>,
    pub saved_step: Option<u64>,
    pub saved_digest: Option<String>,
    pub resumed_step: Option<u64>,
    pub resumed_digest: Option<String>,
    /// Every file of the restored checkpoint equals the one the trainer wrote, byte for byte.
    pub files_identical: bool,
}

impl Timeline {
    /// The run did what Nerve promises: cordoned, committed in time, resumed at the same step
    /// with the same state.
    pub fn succeeded(&self) -> bool {
        self.cordoned.is_some()
            && self.committed.is_some()
            && self.margin.is_some()
            && self.saved_step.is_some()
            && self.saved_step == self.resumed_step
            && self.saved_digest.is_some()
            && self.saved_digest == self.resumed_digest
            && self.files_identical
    }
}

/// Runs the scenario. Every child process is stopped when this returns or is dropped.
pub async fn run_demo(options: &DemoOptions) -> anyhow::Result<Timeline> {
    let out = Printer(options.print);
    let logs = options.work.join("logs");
    std::fs::create_dir_all(&logs).context("creating the log directory")?;
    let pod1_dir = options.work.join("pod-1/checkpoints");
    let pod2_dir = options.work.join("pod-2/checkpoints");
    std::fs::create_dir_all(&pod1_dir).context("creating the first pod's checkpoint directory")?;

    let imds = MetadataSimulator::start();
    let api = ApiServer::start(NODE_NAME);
    let kubeconfig = api.write_kubeconfig(&options.work);
    let (_embedded_s3, mut s3_env) = match &options.s3_endpoint {
        Some(endpoint) => (None, vec![("AWS_ENDPOINT_URL", endpoint.clone())]),
        None => {
            let root = options.work.join("s3");
            std::fs::create_dir_all(&root).context("creating the embedded store's directory")?;
            let server = S3Server::start_at(&root, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
                .context("starting the embedded S3 server")?;
            server
                .create_bucket(&options.bucket)
                .context("creating the demo bucket")?;
            let env = server.client_env();
            (Some(server), env)
        }
    };
    let dest = format!("s3://{}/checkpoints", options.bucket);
    s3_env.push(("NERVE_DEST", dest.clone()));
    s3_env.push(("NERVE_JOB", JOB.to_owned()));
    s3_env.push(("NERVE_PATH_STYLE", "true".to_owned()));
    out.line(format!(
        "metadata service {} · API server {} · S3 {}",
        imds.url(),
        api.url(),
        s3_env
            .iter()
            .find(|(k, _)| *k == "AWS_ENDPOINT_URL")
            .map(|(_, v)| v.as_str())
            .unwrap_or("from the AWS SDK chain")
    ));

    let agent_port = children::free_port()?;
    let sidecar_port = children::free_port()?;
    let agent_url = format!("http://127.0.0.1:{agent_port}");
    let mut children = Children::new(&options.bin_dir, &logs);

    // The agent as the chart's DaemonSet runs it: env vars only.
    children.spawn(
        "nerve-agent",
        &[],
        &[
            ("NERVE_METADATA_URL", imds.url()),
            ("NERVE_LISTEN", format!("127.0.0.1:{agent_port}")),
            ("NERVE_KUBERNETES", "on".to_owned()),
            ("NODE_NAME", NODE_NAME.to_owned()),
            ("KUBECONFIG", kubeconfig.display().to_string()),
        ],
    )?;
    observe::wait_ready(&format!("{agent_url}/readyz"), READY_TIMEOUT)
        .await
        .context("waiting for nerve-agent to be ready (see logs/nerve-agent.log)")?;
    out.line("nerve-agent ready".to_owned());

    // The trainer: training state of `size` bytes, a checkpoint on SIGUSR1.
    let size = options.size.to_string();
    let mut trainer = children.spawn_trainer(
        &[
            "--dir",
            path_str(&pod1_dir)?,
            "--size",
            &size,
            "--done-marker",
            DONE_MARKER,
        ],
        &[],
    )?;
    let started = trainer
        .next_event("started", READY_TIMEOUT)
        .await
        .context("waiting for the trainer to start")?;
    out.line(format!(
        "trainer started (pid {}, {} of training state)",
        started.value["pid"],
        human_bytes(options.size)
    ));

    // The sidecar as the injected native sidecar runs it: env vars only. The target regex names
    // this run's checkpoint directory, so no other process on this host is ever signalled.
    let mut sidecar_env = s3_env.clone();
    sidecar_env.extend([
        ("NERVE_CHECKPOINT_DIR", path_str(&pod1_dir)?.to_owned()),
        ("NERVE_AGENT_URL", agent_url.clone()),
        ("NERVE_METADATA_URL", imds.url()),
        (
            "NERVE_TARGET",
            format!("nerve-trainer .*{}", regex_escape(path_str(&pod1_dir)?)),
        ),
        ("NERVE_DONE_MARKER", DONE_MARKER.to_owned()),
        ("NERVE_LISTEN", format!("127.0.0.1:{sidecar_port}")),
        ("NODE_NAME", NODE_NAME.to_owned()),
        ("POD_NAME", POD_NAME.to_owned()),
        ("HOST_IP", "127.0.0.1".to_owned()),
    ]);
    let sidecar = children.spawn("nerve-sidecar", &["run"], &sidecar_env)?;
    let sidecar_url = format!("http://127.0.0.1:{sidecar_port}");
    observe::wait_ready(&format!("{sidecar_url}/readyz"), READY_TIMEOUT)
        .await
        .context("waiting for nerve-sidecar run to be ready (see logs/nerve-sidecar.log)")?;
    out.line("nerve-sidecar run ready, subscribed to the agent".to_owned());

    tokio::time::sleep(TRAIN_BEFORE_NOTICE).await;

    // The cloud's two-minute warning. The notice format carries whole seconds.
    let deadline_at = OffsetDateTime::now_utc() + options.deadline;
    let deadline_at = deadline_at
        .replace_nanosecond(0)
        .context("rounding the deadline")?;
    let notice_set = Instant::now();
    let deadline = notice_set + (deadline_at - OffsetDateTime::now_utc()).unsigned_abs();
    imds.set_spot_interruption("terminate", deadline_at);
    out.line(String::new());
    out.event(
        Duration::ZERO,
        format!(
            "Spot interruption notice set in the metadata service (deadline in {}s)",
            options.deadline.as_secs()
        ),
    );

    let mut timeline = Timeline::default();
    let mut stream = observe::NoticeStream::connect(&agent_url).await?;
    let watch_until = deadline;
    loop {
        if timeline.committed.is_some() && timeline.cordoned.is_some() {
            break;
        }
        if Instant::now() >= watch_until {
            out.line("deadline reached before the checkpoint was committed".to_owned());
            break;
        }
        tokio::select! {
            notice = stream.next_notice(), if timeline.agent_saw_notice.is_none() => {
                let notice = notice?;
                let at = notice_set.elapsed();
                timeline.notice_id = notice["id"].as_str().unwrap_or_default().to_owned();
                timeline.agent_saw_notice = Some(at);
                out.event(at, format!("agent streamed the notice {}", timeline.notice_id));
            }
            event = trainer.any_event(), if timeline.checkpoint_complete.is_none() => {
                let Some(event) = event else { bail!("the trainer exited before checkpointing") };
                let at = event.at.saturating_duration_since(notice_set);
                match event.name() {
                    "signal" => {
                        timeline.signal_delivered = Some(at);
                        out.event(at, format!("trainer received {} at step {}",
                            event.value["signal"].as_str().unwrap_or("the signal"), event.value["step"]));
                    }
                    "checkpoint" if event.value["reason"] == "signal" => {
                        timeline.saved_step = event.value["step"].as_u64();
                        timeline.saved_digest = event.value["digest"].as_str().map(str::to_owned);
                        out.event(at, format!("trainer wrote checkpoint-{} ({})",
                            event.value["step"], human_bytes(event.value["bytes"].as_u64().unwrap_or(0))));
                    }
                    "done-marker" => {
                        timeline.checkpoint_complete = Some(at);
                        out.event(at, "checkpoint complete (done marker written)".to_owned());
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep(observe::POLL) => {
                if timeline.cordoned.is_none() && let Some(taint) = nerve_taint(&api) {
                    let at = notice_set.elapsed();
                    timeline.cordoned = Some(at);
                    out.event(at, format!(
                        "node {NODE_NAME} cordoned, taint {taint} (recorded by the API server)"));
                    timeline.taint = Some(taint);
                }
                if timeline.committed.is_none()
                    && timeline.checkpoint_complete.is_some()
                    && let Some(generation) = children.committed_generations(&s3_env).await?.pop()
                {
                    let at = notice_set.elapsed();
                    timeline.committed = Some(at);
                    timeline.margin = deadline.checked_duration_since(Instant::now());
                    timeline.committed_generation =
                        generation["generation"].as_str().map(str::to_owned);
                    record_upload(&mut timeline, &sidecar_url).await;
                    report_commit(&out, &timeline, at);
                }
            }
        }
    }

    // The machine goes away: the pod is deleted (SIGTERM to the sidecar), the trainer dies.
    out.line(String::new());
    out.line("the machine goes away: pod deleted (SIGTERM), trainer killed".to_owned());
    trainer.kill().await;
    timeline.sidecar_exit_code = children.terminate(sidecar, POD_TERMINATION_GRACE).await?;
    out.line(format!(
        "nerve-sidecar run exited with {}",
        timeline
            .sidecar_exit_code
            .map(|c| format!("status {c}"))
            .unwrap_or_else(|| "a signal".into())
    ));
    children.stop_all().await;
    timeline.generations = children.committed_generations(&s3_env).await?.len();

    // The next pod: its init container restores, then the trainer resumes.
    out.line(String::new());
    out.line(format!(
        "next pod: nerve-sidecar restore into {}",
        pod2_dir.display()
    ));
    let mut restore_env = s3_env.clone();
    restore_env.push(("NERVE_CHECKPOINT_DIR", path_str(&pod2_dir)?.to_owned()));
    let restore_started = Instant::now();
    let status = children
        .run_to_end("nerve-sidecar", &["restore"], &restore_env)
        .await?;
    ensure!(
        status.success(),
        "nerve-sidecar restore failed with {status} (see logs/nerve-sidecar-restore.log)"
    );
    out.line(format!(
        "restored in {:.2}s",
        restore_started.elapsed().as_secs_f64()
    ));
    let mut resumed = children.spawn_trainer(
        &["--dir", path_str(&pod2_dir)?, "--size", &size, "--verify"],
        &[],
    )?;
    let event = resumed.next_event("resumed", READY_TIMEOUT).await?;
    timeline.resumed_step = event.value["step"].as_u64();
    timeline.resumed_digest = event.value["digest"].as_str().map(str::to_owned);
    timeline.files_identical = match timeline.saved_step {
        Some(step) => {
            let name = crate::trainer::checkpoint_name(step);
            dirs_identical(&pod1_dir.join(&name), &pod2_dir.join(&name))?
        }
        None => false,
    };
    out.line(format!(
        "trainer resumed at step {} (saved at step {}), state {}",
        timeline
            .resumed_step
            .map_or_else(|| "?".into(), |s| s.to_string()),
        timeline
            .saved_step
            .map_or_else(|| "?".into(), |s| s.to_string()),
        if timeline.saved_digest.is_some() && timeline.saved_digest == timeline.resumed_digest {
            "identical"
        } else {
            "DIFFERENT"
        }
    ));
    out.line(format!(
        "checkpoint files byte-identical after restore: {}",
        if timeline.files_identical {
            "yes"
        } else {
            "NO"
        }
    ));
    Ok(timeline)
}

/// Bytes and seconds of the upload, from the sidecar's own metrics.
async fn record_upload(timeline: &mut Timeline, sidecar_url: &str) {
    let metrics = observe::scrape(&format!("{sidecar_url}/metrics"))
        .await
        .unwrap_or_default();
    timeline.bytes_uploaded = observe::sum(
        &metrics,
        "nerve_sidecar_transfer_bytes_total",
        Some("upload"),
    ) as u64;
    timeline.bytes_reused = observe::sum(&metrics, "nerve_sidecar_reused_bytes_total", None) as u64;
    timeline.upload_seconds =
        observe::sum(&metrics, "nerve_sidecar_upload_duration_seconds_sum", None);
}

fn report_commit(out: &Printer, timeline: &Timeline, at: Duration) {
    let rate = if timeline.upload_seconds > 0.0 {
        timeline.bytes_uploaded as f64 / (1024.0 * 1024.0) / timeline.upload_seconds
    } else {
        0.0
    };
    out.event(
        at,
        format!(
            "uploaded {} in {:.2}s ({rate:.0} MiB/s), {} reused",
            human_bytes(timeline.bytes_uploaded),
            timeline.upload_seconds,
            human_bytes(timeline.bytes_reused)
        ),
    );
    out.event(
        at,
        format!(
            "manifest committed: generation {}",
            timeline.committed_generation.as_deref().unwrap_or("?")
        ),
    );
    if let Some(margin) = timeline.margin {
        out.event(
            at,
            format!(
                "safe with {:.1}s to spare before the deadline",
                margin.as_secs_f64()
            ),
        );
    }
}

/// The taint the agent adds, as `key=value:Effect`, once the node is unschedulable.
fn nerve_taint(api: &ApiServer) -> Option<String> {
    if !api.unschedulable() {
        return None;
    }
    api.taints().into_iter().find_map(|taint| {
        (taint["key"] == "nerve.io/interruption").then(|| {
            format!(
                "{}={}:{}",
                taint["key"].as_str().unwrap_or_default(),
                taint["value"].as_str().unwrap_or_default(),
                taint["effect"].as_str().unwrap_or_default()
            )
        })
    })
}

/// Whether two directory trees hold the same relative paths with the same bytes.
fn dirs_identical(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (left, right) = (tree(a)?, tree(b)?);
    if left.is_empty() || left.len() != right.len() {
        return Ok(false);
    }
    for ((path_a, rel_a), (path_b, rel_b)) in left.iter().zip(&right) {
        if rel_a != rel_b {
            return Ok(false);
        }
        let same = std::fs::read(path_a)
            .with_context(|| format!("reading {}", path_a.display()))?
            == std::fs::read(path_b).with_context(|| format!("reading {}", path_b.display()))?;
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Regular files under `root`, sorted by relative path.
fn tree(root: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let rel = path.strip_prefix(root)?.to_path_buf();
                files.push((path, rel));
            }
        }
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(files)
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

/// One line of the trainer's stdout, with the moment it was read.
#[derive(Debug)]
pub struct TrainerEvent {
    pub at: Instant,
    pub value: Value,
}

impl TrainerEvent {
    fn name(&self) -> &str {
        self.value["event"].as_str().unwrap_or_default()
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

    #[test]
    fn identical_trees_compare_equal_and_a_changed_byte_does_not() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            std::fs::create_dir_all(root.join("sub")).unwrap();
            std::fs::write(root.join("sub/x"), b"hello").unwrap();
            std::fs::write(root.join("y"), b"").unwrap();
        }
        assert!(dirs_identical(a.path(), b.path()).unwrap());
        std::fs::write(b.path().join("sub/x"), b"hellO").unwrap();
        assert!(!dirs_identical(a.path(), b.path()).unwrap());
    }
}
