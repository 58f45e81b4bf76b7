//! The demo's child processes: the real binaries, each in its own process group (so Ctrl-C
//! reaches only the demo, which then stops them all), each logging to `logs/<name>.log`, each
//! killed when the demo ends however it ends.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::TrainerEvent;

/// How long a stopped child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Trainer events buffered before the reader waits; the trainer prints a handful per run.
const EVENT_BUFFER: usize = 256;

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Which child, for [`Children::terminate`].
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
        let log_path = self.logs.join(format!("{log}.log"));
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

    /// Starts a long-running binary; it is stopped by [`Children::stop_all`] or on drop.
    pub fn spawn(
        &mut self,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<ChildId> {
        let child = self
            .command(binary, args, env, binary)?
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        self.running.push((binary.to_owned(), child));
        Ok(ChildId(self.running.len() - 1))
    }

    /// Starts `nerve-trainer`, whose stdout lines are events.
    pub fn spawn_trainer(
        &mut self,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<TrainerEvents> {
        let mut command = self.command("nerve-trainer", args, env, "nerve-trainer")?;
        command.stdout(Stdio::piped());
        let mut child = command.spawn().context("starting nerve-trainer")?;
        let stdout = child.stdout.take().context("trainer stdout")?;
        let (sender, events) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let at = Instant::now();
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if sender.send(TrainerEvent { at, value }).await.is_err() {
                    break;
                }
            }
        });
        Ok(TrainerEvents { child, events })
    }

    /// Runs a binary to completion (a one-shot command such as `restore`).
    pub async fn run_to_end(
        &self,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<ExitStatus> {
        let log = format!("{binary}-{}", args.first().copied().unwrap_or("run"));
        self.command(binary, args, env, &log)?
            .status()
            .await
            .with_context(|| format!("running {binary} {}", args.join(" ")))
    }

    /// Committed generations of the demo job, oldest first, as `nerve-sidecar list --json`
    /// prints them: the product's own view of the store.
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
            .filter_map(|line| serde_json::from_str(line).ok())
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

    /// Stops every child still running: SIGTERM, then SIGKILL after a grace period.
    pub async fn stop_all(&mut self) {
        for (_, child) in &mut self.running {
            let _ = stop(child, STOP_GRACE).await;
        }
    }
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

/// A running trainer and the events it prints.
pub struct TrainerEvents {
    child: Child,
    events: mpsc::Receiver<TrainerEvent>,
}

impl TrainerEvents {
    /// The next event of any kind; `None` once the trainer's stdout closed.
    pub async fn any_event(&mut self) -> Option<TrainerEvent> {
        self.events.recv().await
    }

    /// Skips events until one named `name`, within `timeout`.
    pub async fn next_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<TrainerEvent> {
        let wait = async {
            while let Some(event) = self.events.recv().await {
                if event.name() == "error" {
                    bail!("the trainer reported: {}", event.value["message"]);
                }
                if event.name() == name {
                    return Ok(event);
                }
            }
            bail!("the trainer exited before printing `{name}` (see logs/nerve-trainer.log)")
        };
        tokio::time::timeout(timeout, wait)
            .await
            .with_context(|| format!("the trainer did not print `{name}` within {timeout:?}"))?
    }

    /// The machine goes away: the trainer dies without warning.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
