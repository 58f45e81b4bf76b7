//! The training pods: per rank a trainer (training state of `--size`, a checkpoint on SIGUSR1;
//! with several ranks it agrees with the others on the step to save) and `nerve-sidecar run`
//! configured as the injector configures it, by environment variables only.

use std::path::Path;

use anyhow::Context;
use tokio::sync::mpsc;

use super::children::{ChildId, free_port};
use super::observe::{self, Seen, Source};
use super::{DONE_MARKER, Demo, READY_TIMEOUT, human_bytes, path_str, regex_escape};

/// One rank's pod.
pub struct Pod {
    pub trainer: ChildId,
    pub sidecar: ChildId,
    /// Where the sidecar serves metrics and health.
    pub sidecar_url: String,
}

impl Demo<'_> {
    /// Starts every rank's trainer, then every rank's sidecar, each once ready; their lines go
    /// to `sender`.
    pub(super) async fn start_pods(
        &mut self,
        sender: &mpsc::Sender<Seen>,
        seen: &mut mpsc::Receiver<Seen>,
    ) -> anyhow::Result<Vec<Pod>> {
        let mut trainers = Vec::with_capacity(self.names.ranks);
        for rank in 0..self.names.ranks {
            let dir = self.names.pod_dir(&self.options.work, 1, rank);
            std::fs::create_dir_all(&dir).context("creating a pod's checkpoint directory")?;
            trainers.push((dir, self.start_trainer(rank, sender)?));
        }
        for _ in 0..self.names.ranks {
            let started = observe::next_event(seen, "started", READY_TIMEOUT, |source| {
                matches!(source, Source::Trainer(_))
            })
            .await
            .context("waiting for the trainers to start")?;
            let Source::Trainer(rank) = started.source else {
                continue;
            };
            self.out.line(format!(
                "{}trainer started (pid {}, {} of training state)",
                self.names.rank(rank),
                started.value["pid"],
                human_bytes(self.options.size)
            ));
        }
        let mut pods = Vec::with_capacity(self.names.ranks);
        for (rank, (dir, trainer)) in trainers.into_iter().enumerate() {
            let (sidecar, sidecar_url) = self.start_sidecar(rank, &dir, sender)?;
            pods.push(Pod {
                trainer,
                sidecar,
                sidecar_url,
            });
        }
        for (rank, pod) in pods.iter().enumerate() {
            self.wait_sidecar_ready(rank, pod).await?;
        }
        Ok(pods)
    }

    fn start_trainer(
        &mut self,
        rank: usize,
        sender: &mpsc::Sender<Seen>,
    ) -> anyhow::Result<ChildId> {
        let dir = self.names.pod_dir(&self.options.work, 1, rank);
        let mut args = self.trainer_args(rank, &dir)?;
        args.extend(["--done-marker".to_owned(), DONE_MARKER.to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.names.log("nerve-trainer", rank);
        let source = Source::Trainer(rank);
        self.children
            .spawn_watched("nerve-trainer", &log, &args, &[], source, sender)
    }

    /// The trainer of rank `rank` on `dir`: its state, and with several ranks its place in the
    /// job and the directory the ranks agree through (what torch.distributed is to a real job).
    pub(super) fn trainer_args(&self, rank: usize, dir: &Path) -> anyhow::Result<Vec<String>> {
        let mut args = vec![
            "--dir".to_owned(),
            path_str(dir)?.to_owned(),
            "--size".to_owned(),
            self.options.size.to_string(),
        ];
        if self.names.multi() {
            let peers = self.options.work.join("peers");
            args.extend([
                "--rank".to_owned(),
                rank.to_string(),
                "--world-size".to_owned(),
                self.names.ranks.to_string(),
                "--peers".to_owned(),
                path_str(&peers)?.to_owned(),
            ]);
        }
        Ok(args)
    }

    /// The sidecar as the injected native sidecar runs it: env vars only. Its log goes to
    /// `sender` (as JSON, with several ranks: how it heard of another pod's notice is told
    /// there).
    fn start_sidecar(
        &mut self,
        rank: usize,
        dir: &Path,
        sender: &mpsc::Sender<Seen>,
    ) -> anyhow::Result<(ChildId, String)> {
        let port = free_port()?;
        let env = self.sidecar_env(rank, dir, port)?;
        let log = self.names.log("nerve-sidecar", rank);
        let source = Source::Sidecar(rank);
        let id =
            self.children
                .spawn_watched("nerve-sidecar", &log, &["run"], &env, source, sender)?;
        Ok((id, format!("http://127.0.0.1:{port}")))
    }

    /// The target regex names this pod's checkpoint directory, so no other process on this
    /// host is ever signalled.
    fn sidecar_env(
        &self,
        rank: usize,
        dir: &Path,
        port: u16,
    ) -> anyhow::Result<Vec<(&'static str, String)>> {
        let machine = &self.world.machines[rank];
        let mut env = self.store_env_for(rank, dir)?;
        env.extend([
            ("NERVE_AGENT_URL", machine.agent_url.clone()),
            ("NERVE_METADATA_URL", machine.imds.url()),
            (
                "NERVE_TARGET",
                format!("nerve-trainer .*{}", regex_escape(path_str(dir)?)),
            ),
            ("NERVE_DONE_MARKER", DONE_MARKER.to_owned()),
            ("NERVE_LISTEN", format!("127.0.0.1:{port}")),
            ("NODE_NAME", machine.node.clone()),
            ("POD_NAME", format!("trainer-{rank}")),
            ("HOST_IP", "127.0.0.1".to_owned()),
        ]);
        if self.names.multi() {
            env.push(("NERVE_LOG_FORMAT", "json".to_owned()));
        }
        Ok(env)
    }

    /// The store, the checkpoint directory and, with several ranks, the rank and world size, as
    /// the injector sets them in the sidecar and restore containers.
    pub(super) fn store_env_for(
        &self,
        rank: usize,
        dir: &Path,
    ) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut env = self.world.store_env.clone();
        env.push(("NERVE_CHECKPOINT_DIR", path_str(dir)?.to_owned()));
        if self.names.multi() {
            env.push(("NERVE_RANK", rank.to_string()));
            env.push(("NERVE_WORLD_SIZE", self.names.ranks.to_string()));
        }
        Ok(env)
    }

    async fn wait_sidecar_ready(&self, rank: usize, pod: &Pod) -> anyhow::Result<()> {
        let log = self.names.log("nerve-sidecar", rank);
        observe::wait_ready(&format!("{}/readyz", pod.sidecar_url), READY_TIMEOUT)
            .await
            .with_context(|| {
                format!("waiting for nerve-sidecar run to be ready (see logs/{log}.log)")
            })?;
        self.out.line(format!(
            "{}nerve-sidecar run ready, subscribed to the agent{}",
            self.names.rank(rank),
            self.names.on(rank)
        ));
        Ok(())
    }
}
