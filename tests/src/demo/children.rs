//! The demo's child processes: the real binaries, each in its own process group (so Ctrl-C
//! reaches only the demo, which then stops them all), each logging to `logs/<name>.log`, each
//! killed when the demo ends however it ends. The output the demo watches (the trainer's events,
//! a sidecar's JSON log) goes to the log too, and each of its JSON lines to the demo as it is
//! read.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::observe::{CLOSED, Seen, Source};

/// How long a stopped child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Which child, for [`Children::terminate`] and [`Children::kill`].
#[derive(Clone, Copy, Debug)]
pub struct ChildId(usize);

pub struct Children {
    bin_dir: PathBuf,
    logs: PathBuf,
    running: Vec<(String, Child)>,
}

impl Children {
    pub fn new(bin_dir: &Path, logs: &Path) -> Self {
        Self {
            bin_dir: bin_dir.to_path_buf(),
            logs: logs.to_path_buf(),
            running: Vec::new(),
        }
    }

    fn log_path(&self, log: &str) -> PathBuf {
        self.logs.join(format!("{log}.log"))
    }

    fn command(
        &self,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: &str,
    ) -> anyhow::Result<Command> {
        let path = self.bin_dir.join(binary);
        if !path.exists() {
            bail!(
                "{} is missing; build it with `cargo build --release --workspace --bins`",
                path.display()
            );
        }
        let log_path = self.log_path(log);
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = Command::new(path);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0)
            .kill_on_drop(true);
        Ok(command)
    }

    /// Starts a long-running binary logging to `logs/<log>.log`; it is stopped by
    /// [`Children::stop_all`] or on drop.
    pub fn spawn(
        &mut self,
        binary: &str,
        log: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<ChildId> {
        let child = self
            .command(binary, args, env, log)?
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(self.keep(log, child))
    }

    /// Like [`Children::spawn`], and every JSON line of the output `source` watches (the
    /// trainer's events on stdout, a sidecar's log on stderr) goes to `seen`, then [`CLOSED`]
    /// once that output ends.
    pub fn spawn_watched(
        &mut self,
        binary: &str,
        log: &str,
        args: &[&str],
        env: &[(&str, String)],
        source: Source,
        seen: &mpsc::Sender<Seen>,
    ) -> anyhow::Result<ChildId> {
        let mut command = self.command(binary, args, env, log)?;
        let events_on_stdout = matches!(source, Source::Trainer(_));
        if events_on_stdout {
            command.stdout(Stdio::piped());
        } else {
            command.stderr(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let output: Box<dyn AsyncRead + Send + Unpin> = if events_on_stdout {
            Box::new(child.stdout.take().context("the child's stdout")?)
        } else {
            Box::new(child.stderr.take().context("the child's stderr")?)
        };
        let log_path = self.log_path(log);
        tokio::spawn(relay(output, log_path, source, seen.clone()));
        Ok(self.keep(log, child))
    }

    fn keep(&mut self, log: &str, child: Child) -> ChildId {
        self.running.push((log.to_owned(), child));
        ChildId(self.running.len() - 1)
    }

    /// Runs a binary to completion (a one-shot command such as `restore`), logging to
    /// `logs/<log>.log`.
    pub async fn run_to_end(
        &self,
        binary: &str,
        log: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<ExitStatus> {
        self.command(binary, args, env, log)?
            .status()
            .await
            .with_context(|| format!("running {binary} {}", args.join(" ")))
    }

    /// Committed generations of the demo job, oldest first, as `nerve-sidecar list --json`
    /// prints them: the product's own view of the store. A multi-pod generation some rank has
    /// not committed yet is not one.
    pub async fn committed_generations(
        &self,
        env: &[(&str, String)],
    ) -> anyhow::Result<Vec<Value>> {
        let mut command = self.command(
            "nerve-sidecar",
            &["list", "--json"],
            env,
            "nerve-sidecar-list",
        )?;
        let output = command
            .stdout(Stdio::piped())
            .output()
            .await
            .context("running nerve-sidecar list")?;
        if !output.status.success() {
            bail!(
                "nerve-sidecar list failed with {} (see logs/nerve-sidecar-list.log)",
                output.status
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|generation| generation["committed"] == true)
            .collect())
    }

    /// Sends SIGTERM to one child and waits for it to exit; its exit code, or `None` when a
    /// signal ended it. Killed after `grace`.
    pub async fn terminate(&mut self, id: ChildId, grace: Duration) -> anyhow::Result<Option<i32>> {
        let (name, child) = &mut self.running[id.0];
        let status = stop(child, grace)
            .await
            .with_context(|| format!("stopping {name}"))?;
        Ok(status.code())
    }

    /// The machine goes away: the child dies without warning.
    pub async fn kill(&mut self, id: ChildId) {
        let _ = self.running[id.0].1.kill().await;
    }

    /// Stops every child still running: SIGTERM, then SIGKILL after a grace period.
    pub async fn stop_all(&mut self) {
        for (_, child) in &mut self.running {
            let _ = stop(child, STOP_GRACE).await;
        }
    }
}

/// Appends every line of `output` to the log and passes its JSON lines on, timed as read. It
/// never waits for the demo: a child blocked on a full pipe would stall the very thing shown,
/// so once the demo stops listening (or falls a whole buffer behind) lines only go to the log.
async fn relay(
    output: impl AsyncRead + Unpin,
    log_path: PathBuf,
    source: Source,
    seen: mpsc::Sender<Seen>,
) {
    let mut log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .await
        .ok();
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let at = Instant::now();
        if let Some(log) = log.as_mut() {
            let _ = log.write_all(format!("{line}\n").as_bytes()).await;
        }
        if let Ok(value) = serde_json::from_str::<Value>(&line) {
            let _ = seen.try_send(Seen { source, at, value });
        }
    }
    let closed = json!({ "event": CLOSED });
    let _ = seen.try_send(Seen {
        source,
        at: Instant::now(),
        value: closed,
    });
}

async fn stop(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            child.kill().await?;
            child.wait().await
        }
    }
}
