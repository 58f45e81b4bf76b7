//! A simulated training pod for end-to-end tests and benchmarks: its processes (trainer, sidecar,
//! agent) with their output collected, its checkpoint directory, and the stand-ins around it (the
//! S3 server, the metadata service); a multi-pod job of such pods on simulated nodes.
//!
//! Tests share one process namespace, unlike pods: every sidecar gets a `--target` that matches
//! only its own trainer (the checkpoint directory is unique per test).
//!
//! The `*_command` builders say how each process is started; the plain starters spawn it and
//! panic on a failure (a failed step is a failed test), the `try_*` ones return the error (for
//! the benchmarks, which report and exit).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use time::OffsetDateTime;

use crate::imds::MetadataSimulator;
pub use crate::process::{Proc, wait_for};
use crate::s3::S3Server;

/// Generous bounds: the machine running the tests may be loaded; none of them is a speed claim.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(90);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

pub const BUCKET: &str = "ckpt";
pub const PREFIX: &str = "jobs";

/// How the processes of a rig are tuned, flags added to every one of them: small and quick for
/// the tests ([`Tuning::tests`]); a benchmark sets its own sizes and keeps the product defaults.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Flags of every `nerve-trainer` (state size, step time).
    pub trainer: Vec<String>,
    /// Flags of every `nerve-sidecar run` (polls, quiet period, transfer tuning).
    pub sidecar: Vec<String>,
    /// Flags of every `nerve-agent` (its metadata poll interval).
    pub agent: Vec<String>,
}

impl Tuning {
    /// The tests': a 6 MiB state in 10 ms steps; 200 ms polls, so a notice is heard within a
    /// fraction of a second; a 2 s quiet period; 5 MiB parts (S3's smallest) over 4 streams, so
    /// even a small checkpoint is a multipart upload.
    pub fn tests() -> Tuning {
        let flags = |flags: &[&str]| flags.iter().map(|f| (*f).to_owned()).collect();
        Tuning {
            trainer: flags(&["--size", "6MiB", "--step-time", "10ms"]),
            sidecar: flags(&[
                "--poll-interval",
                "200ms",
                "--quiet-period",
                "2s",
                "--part-size",
                "5MiB",
                "--concurrency",
                "4",
            ]),
            agent: flags(&["--poll-interval", "200ms"]),
        }
    }
}

/// One test's world: S3, the metadata service, a checkpoint directory, a job.
pub struct Rig {
    pub s3: S3Server,
    pub imds: MetadataSimulator,
    pub work: tempfile::TempDir,
    pub dir: PathBuf,
    pub job: String,
    pub tuning: Tuning,
}

impl Rig {
    pub fn new(job: &str) -> Rig {
        Rig::try_new(job, Tuning::tests()).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_new(job: &str, tuning: Tuning) -> anyhow::Result<Rig> {
        let s3 = S3Server::start().context("starting the S3 server")?;
        s3.create_bucket(BUCKET).context("creating the bucket")?;
        let imds = MetadataSimulator::start();
        let work = tempfile::Builder::new()
            .prefix("nerve-run-")
            .tempdir()
            .context("creating the working directory")?;
        let dir = work.path().join("checkpoints");
        std::fs::create_dir(&dir).context("creating the checkpoint directory")?;
        Ok(Rig {
            s3,
            imds,
            work,
            dir,
            job: job.to_owned(),
            tuning,
        })
    }

    /// A regex matching this test's trainers only.
    pub fn target(&self) -> String {
        target_for(&self.dir)
    }

    pub fn trainer(&self, dir: &Path, extra: &[&str]) -> Proc {
        self.trainer_with_env(dir, extra, &[])
    }

    /// A trainer with extra environment variables (a container's, say).
    pub fn trainer_with_env(&self, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = self.trainer_command(dir, extra);
        Proc::spawn("nerve-trainer", command.envs(env.iter().copied()))
    }

    /// `nerve-trainer --dir <dir> <tuning> <extra>`.
    pub fn trainer_command(&self, dir: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(crate::binary_path("nerve-trainer"));
        command
            .arg("--dir")
            .arg(dir)
            .args(&self.tuning.trainer)
            .args(extra);
        command
    }

    pub fn store_args(&self) -> Vec<String> {
        vec![
            "--dest".into(),
            format!("s3://{BUCKET}/{PREFIX}"),
            "--job".into(),
            self.job.clone(),
            "--path-style".into(),
        ]
    }

    /// The real agent against the simulator; returns it and its stream URL.
    pub fn agent(&self) -> (Proc, String) {
        try_start_agent(&self.imds.url(), &self.tuning.agent).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn sidecar(&self, agent_url: &str, extra: &[&str]) -> Proc {
        self.sidecar_with_env(agent_url, extra, &[])
    }

    /// A sidecar with extra environment variables (`AWS_ENDPOINT_URL` of a proxy, say).
    pub fn sidecar_with_env(&self, agent_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let node = Node {
            agent_url: agent_url.to_owned(),
            metadata_url: self.imds.url(),
        };
        self.sidecar_in(&self.dir, &node, extra, env)
    }

    /// A sidecar guarding `dir` (another pod's directory, in a multi-pod test), signalling only
    /// the trainers of `dir`.
    pub fn sidecar_in(
        &self,
        dir: &Path,
        node: &Node,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let mut command = self.run_command(dir, node, extra);
        try_start_sidecar(command.envs(env.iter().copied())).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `nerve-sidecar run` guarding `dir` on `node`, logging JSON: the store, the node's agent
    /// and metadata service, a target matching only the trainers of `dir`, the tuning, `extra`.
    pub fn run_command(&self, dir: &Path, node: &Node, extra: &[&str]) -> Command {
        let mut command = Command::new(crate::binary_path("nerve-sidecar"));
        command
            .args(["--log-format", "json", "run", "--dir"])
            .arg(dir)
            .args(self.store_args())
            .args(["--agent-url", &node.agent_url])
            .args(["--metadata-url", &node.metadata_url])
            .args(["--listen", "127.0.0.1:0", "--target", &target_for(dir)])
            .args(&self.tuning.sidecar)
            .args(extra)
            .envs(self.s3.client_env())
            .env("RUST_LOG", "info,aws=warn,hyper=warn");
        command
    }

    /// Committed manifests, oldest first.
    pub fn manifests(&self) -> Vec<Value> {
        let gen_dir = self
            .s3
            .root()
            .join(BUCKET)
            .join(PREFIX)
            .join(&self.job)
            .join("gen");
        let mut names: Vec<_> = std::fs::read_dir(&gen_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".manifest.json") && !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| std::fs::read(gen_dir.join(n)).ok())
            .filter_map(|raw| serde_json::from_slice(&raw).ok())
            .collect()
    }

    pub fn wait_manifests(&self, count: usize, timeout: Duration, sidecar: &Proc) -> Vec<Value> {
        wait_for("manifests", timeout, || {
            let manifests = self.manifests();
            (manifests.len() >= count).then_some(manifests)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {count} committed generations, found {}; sidecar said:\n{}",
                self.manifests().len(),
                sidecar.output()
            )
        })
    }

    /// `nerve-sidecar <command> --dir <dir> <store flags> <extra>` to completion.
    pub fn sidecar_command(
        &self,
        command: &str,
        dir: &Path,
        extra: &[&str],
    ) -> std::process::Output {
        Command::new(crate::binary_path("nerve-sidecar"))
            .args([command, "--dir"])
            .arg(dir)
            .args(self.store_args())
            .args(extra)
            .envs(self.s3.client_env())
            .output()
            .unwrap_or_else(|e| panic!("running nerve-sidecar {command}: {e}"))
    }

    /// `nerve-sidecar <command> <store flags> <extra>` (list, prune) to completion.
    pub fn store_command(&self, command: &str, extra: &[&str]) -> std::process::Output {
        Command::new(crate::binary_path("nerve-sidecar"))
            .arg(command)
            .args(self.store_args())
            .args(extra)
            .envs(self.s3.client_env())
            .output()
            .unwrap_or_else(|e| panic!("running nerve-sidecar {command}: {e}"))
    }

    /// `nerve-sidecar restore` into a fresh directory, then the trainer's `--verify` on it.
    pub fn restore_and_verify(&self) -> Value {
        let restored = self.work.path().join(format!(
            "restored-{}",
            OffsetDateTime::now_utc().unix_timestamp_nanos()
        ));
        std::fs::create_dir(&restored).expect("restore dir");
        let output = self.sidecar_command("restore", &restored, &[]);
        assert!(
            output.status.success(),
            "restore failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut verify = self.trainer(&restored, &["--verify"]);
        let status = verify.wait_exit(EXIT_TIMEOUT);
        assert!(status.success(), "verify failed:\n{}", verify.output());
        verify.event("resumed", Duration::from_secs(5))
    }
}

/// A job of `world` pods (a trainer and a sidecar each, with ranks) sharing the rig's S3
/// server; the trainers agree on the step to save through files in `peers` (a MAX all-reduce).
pub struct Job {
    pub rig: Rig,
    pub world: u32,
    pub peers: PathBuf,
}

impl Job {
    pub fn new(name: &str, world: u32) -> Job {
        Job::try_new(name, world, Tuning::tests()).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_new(name: &str, world: u32, tuning: Tuning) -> anyhow::Result<Job> {
        let rig = Rig::try_new(name, tuning)?;
        let peers = rig.work.path().join("peers");
        for rank in 0..world {
            let dir = rig.work.path().join(format!("pod-{rank}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Job { rig, world, peers })
    }

    pub fn dir(&self, rank: u32) -> PathBuf {
        self.rig.work.path().join(format!("pod-{rank}"))
    }

    pub fn rank_args(&self, rank: u32) -> Vec<String> {
        vec![
            "--rank".into(),
            rank.to_string(),
            "--world-size".into(),
            self.world.to_string(),
        ]
    }

    pub fn trainer(&self, rank: u32, extra: &[&str]) -> Proc {
        Proc::spawn("nerve-trainer", &mut self.trainer_command(rank, extra))
    }

    /// Rank `rank`'s trainer, agreeing with the others through `peers`.
    pub fn trainer_command(&self, rank: u32, extra: &[&str]) -> Command {
        let mut args = self.rank_args(rank);
        args.extend(["--peers".into(), self.peers.display().to_string()]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.rig.trainer_command(&self.dir(rank), &args)
    }

    /// Rank `rank`'s sidecar, hearing notices from the rig's metadata service (no agent).
    pub fn sidecar(&self, rank: u32, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let node = Node {
            agent_url: closed_port_url(),
            metadata_url: self.rig.imds.url(),
        };
        self.sidecar_on(rank, &node, extra, env)
    }

    /// Rank `rank`'s sidecar on `node` (its own agent and metadata service).
    pub fn sidecar_on(&self, rank: u32, node: &Node, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = self.run_command(rank, node, extra);
        try_start_sidecar(command.envs(env.iter().copied())).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Rank `rank`'s `nerve-sidecar run` on `node`.
    pub fn run_command(&self, rank: u32, node: &Node, extra: &[&str]) -> Command {
        let mut args = self.rank_args(rank);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.rig.run_command(&self.dir(rank), node, &args)
    }

    pub fn gen_dir(&self) -> PathBuf {
        self.rig
            .s3
            .root()
            .join(BUCKET)
            .join(PREFIX)
            .join(&self.rig.job)
            .join("gen")
    }

    /// The job manifest of the generation of `step`, once committed.
    pub fn job_manifest(&self, step: u64) -> Option<Value> {
        let raw = std::fs::read(
            self.gen_dir()
                .join(format!("step-{step:012}.manifest.json")),
        );
        raw.ok().and_then(|raw| serde_json::from_slice(&raw).ok())
    }

    /// Ranks whose part of `step` is committed.
    pub fn parts(&self, step: u64) -> Vec<u32> {
        let dir = self.gen_dir().join(format!("step-{step:012}"));
        let mut ranks: Vec<u32> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.strip_prefix("rank-")?
                            .strip_suffix(".manifest.json")?
                            .parse()
                            .ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        ranks.sort_unstable();
        ranks
    }

    pub fn store_command(&self, rank: u32, command: &str, extra: &[&str]) -> Output {
        let mut args = self.rank_args(rank);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.rig.store_command(command, &args)
    }

    pub fn command(&self, rank: u32, command: &str, dir: &Path, extra: &[&str]) -> Output {
        let mut args = self.rank_args(rank);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.rig.sidecar_command(command, dir, &args)
    }

    /// Restores into a fresh directory as `rank` and has that rank's trainer load it.
    pub fn restore_and_verify(&self, rank: u32, extra: &[&str]) -> (PathBuf, Value) {
        let dir = self
            .rig
            .work
            .path()
            .join(format!("restored-{rank}-{}", extra.join("")));
        let output = self.command(rank, "restore", &dir, extra);
        assert!(
            output.status.success(),
            "restore as rank {rank}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut args = self.rank_args(rank);
        args.extend([
            "--peers".into(),
            self.peers.display().to_string(),
            "--verify".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut verify = self.rig.trainer(&dir, &args);
        let status = verify.wait_exit(EXIT_TIMEOUT);
        assert!(
            status.success(),
            "verify as rank {rank}:\n{}",
            verify.output()
        );
        (dir, verify.event("resumed", Duration::from_secs(5)))
    }
}

/// Where a pod's sidecar hears notices: its node's agent and metadata service.
#[derive(Debug, Clone)]
pub struct Node {
    pub agent_url: String,
    pub metadata_url: String,
}

/// Simulated machines: a metadata service and a real agent each (Kubernetes off).
pub struct Nodes {
    pub simulators: Vec<MetadataSimulator>,
    pub agents: Vec<Proc>,
    pub nodes: Vec<Node>,
}

impl Nodes {
    /// `count` nodes with the tests' agents.
    pub fn start(count: usize) -> Nodes {
        Nodes::try_start(count, &Tuning::tests().agent).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `count` nodes, each agent started with `agent_flags`.
    pub fn try_start(count: usize, agent_flags: &[String]) -> anyhow::Result<Nodes> {
        let simulators: Vec<MetadataSimulator> =
            (0..count).map(|_| MetadataSimulator::start()).collect();
        let mut agents = Vec::with_capacity(count);
        let mut nodes = Vec::with_capacity(count);
        for imds in &simulators {
            let (agent, agent_url) = try_start_agent(&imds.url(), agent_flags)?;
            agents.push(agent);
            nodes.push(Node {
                agent_url,
                metadata_url: imds.url(),
            });
        }
        Ok(Nodes {
            simulators,
            agents,
            nodes,
        })
    }
}

/// The real agent against the metadata service at `metadata_url` (one node's), with the tests'
/// tuning; returns it and its stream URL.
pub fn agent_for(metadata_url: &str) -> (Proc, String) {
    try_start_agent(metadata_url, &Tuning::tests().agent).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The real agent (Kubernetes off) against `metadata_url` with `flags`, once it serves; returns
/// it and its stream URL.
pub fn try_start_agent(metadata_url: &str, flags: &[String]) -> anyhow::Result<(Proc, String)> {
    let agent = Proc::try_spawn(
        "nerve-agent",
        Command::new(crate::binary_path("nerve-agent"))
            .args(["--log-format", "json", "--kubernetes", "off"])
            .args(["--listen", "127.0.0.1:0", "--metadata-url", metadata_url])
            .args(flags)
            .env("RUST_LOG", "info"),
    )?;
    let (_, line) = agent.try_log(
        "nerve-agent serving the notice stream, metrics and health",
        STARTUP_TIMEOUT,
    )?;
    let addr = line["fields"]["addr"]
        .as_str()
        .context("the agent's serving line names no address")?
        .to_owned();
    Ok((agent, format!("http://{addr}")))
}

/// Starts a `nerve-sidecar run` command and waits until it runs.
pub fn try_start_sidecar(command: &mut Command) -> anyhow::Result<Proc> {
    let sidecar = Proc::try_spawn("nerve-sidecar", command)?;
    sidecar.try_log("sidecar running", STARTUP_TIMEOUT)?;
    Ok(sidecar)
}

/// A regex matching the trainers of `dir` only (tests share one process namespace): the test
/// trainer, or the Python one of the trainer integration's tests.
pub fn target_for(dir: &Path) -> String {
    format!(
        "(nerve-trainer|hf_layout_trainer\\.py) .*--dir {}( |$)",
        dir.display().to_string().replace('.', "\\.")
    )
}

/// A plain HTTP/1.1 GET: status code and body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A port nothing listens on: an agent that is down.
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

pub fn in_seconds(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::seconds(seconds)
}

/// The relative paths a manifest (a single pod's or a rank's part) lists.
pub fn manifest_paths(manifest: &Value) -> Vec<String> {
    manifest["files"]
        .as_array()
        .expect("a manifest lists its files")
        .iter()
        .map(|f| f["path"].as_str().expect("path").to_owned())
        .collect()
}

/// Sidecar flags of a pod whose trainer marks its saves with `DONE` and whose sidecar syncs
/// them in the background every 300 ms (fast enough for a test to see a periodic generation).
pub const MARKED_AND_SYNCING: [&str; 6] = [
    "--done-marker",
    "DONE",
    "--background-sync",
    "true",
    "--sync-interval",
    "300ms",
];
