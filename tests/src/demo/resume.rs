//! After the commit: the machine goes away (its pod deleted, and with several ranks the job's
//! other pods too, as a job restarts when a node is lost), then the next pods restore as their
//! ranks and each trainer checks it resumes at the step it saved with the same state.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, ensure};
use tokio::sync::mpsc;

use super::observe::{self, SEEN_BUFFER, Source};
use super::pods::Pod;
use super::{Demo, POD_TERMINATION_GRACE, READY_TIMEOUT, RankTimeline, Timeline};
use crate::trainer::checkpoint_name;

impl Demo<'_> {
    /// The pods are deleted: every trainer dies, every sidecar gets SIGTERM and must exit 0.
    pub(super) async fn machine_goes_away(
        &mut self,
        pods: &[Pod],
        timeline: &mut Timeline,
    ) -> anyhow::Result<()> {
        self.out.line(String::new());
        self.out.line(if self.names.multi() {
            let node = self.names.node(self.names.noticed());
            format!("{node} goes away: the job's pods deleted (SIGTERM), trainers killed")
        } else {
            "the machine goes away: pod deleted (SIGTERM), trainer killed".to_owned()
        });
        for pod in pods {
            self.children.kill(pod.trainer).await;
        }
        for (rank, pod) in pods.iter().enumerate() {
            let code = self
                .children
                .terminate(pod.sidecar, POD_TERMINATION_GRACE)
                .await?;
            timeline.ranks[rank].sidecar_exit_code = code;
            let how = code.map_or_else(|| "a signal".into(), |c| format!("status {c}"));
            self.out.line(format!(
                "{}nerve-sidecar run exited with {how}",
                self.names.rank(rank)
            ));
        }
        self.children.stop_all().await;
        timeline.generations = self
            .children
            .committed_generations(&self.world.store_env)
            .await?
            .len();
        Ok(())
    }

    /// The next pods: each one's init container restores as its rank, then its trainer resumes.
    pub(super) async fn resume(&mut self, timeline: &mut Timeline) -> anyhow::Result<()> {
        for rank in 0..self.names.ranks {
            let saved = self.names.pod_dir(&self.options.work, 1, rank);
            let restored = self.names.pod_dir(&self.options.work, 2, rank);
            self.restore(rank, &restored).await?;
            let resumed = &mut timeline.ranks[rank];
            self.resume_trainer(rank, &restored, resumed).await?;
            resumed.files_identical = match resumed.saved_step {
                Some(step) => {
                    let name = checkpoint_name(step);
                    let own = self.names.multi().then_some(rank);
                    dirs_identical(&saved.join(&name), &restored.join(&name), own)?
                }
                None => false,
            };
            self.report_resumed(rank, resumed);
        }
        Ok(())
    }

    async fn restore(&mut self, rank: usize, dir: &Path) -> anyhow::Result<()> {
        let who = self.names.rank(rank);
        self.out.line(String::new());
        self.out.line(format!(
            "{who}next pod: nerve-sidecar restore into {}",
            dir.display()
        ));
        let env = self.store_env_for(rank, dir)?;
        let log = self.names.log("nerve-sidecar-restore", rank);
        let started = Instant::now();
        let status = self
            .children
            .run_to_end("nerve-sidecar", &log, &["restore"], &env)
            .await?;
        ensure!(
            status.success(),
            "nerve-sidecar restore failed with {status} (see logs/{log}.log)"
        );
        let seconds = started.elapsed().as_secs_f64();
        self.out.line(format!("{who}restored in {seconds:.2}s"));
        Ok(())
    }

    /// The trainer's `--verify` on what was restored: the step and digest it resumes with.
    async fn resume_trainer(
        &mut self,
        rank: usize,
        dir: &Path,
        resumed: &mut RankTimeline,
    ) -> anyhow::Result<()> {
        let mut args = self.trainer_args(rank, dir)?;
        args.push("--verify".to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (sender, mut seen) = mpsc::channel(SEEN_BUFFER);
        let log = self.names.log("nerve-trainer", rank);
        let source = Source::Trainer(rank);
        self.children
            .spawn_watched("nerve-trainer", &log, &args, &[], source, &sender)?;
        let event = observe::next_event(&mut seen, "resumed", READY_TIMEOUT, |s| s == source)
            .await
            .context("waiting for the trainer to resume")?;
        resumed.resumed_step = event.value["step"].as_u64();
        resumed.resumed_digest = event.value["digest"].as_str().map(str::to_owned);
        Ok(())
    }

    fn report_resumed(&self, rank: usize, resumed: &RankTimeline) {
        let who = self.names.rank(rank);
        let step = |s: Option<u64>| s.map_or_else(|| "?".into(), |s| s.to_string());
        let state = match resumed.saved_digest.is_some()
            && resumed.saved_digest == resumed.resumed_digest
        {
            true => "identical",
            false => "DIFFERENT",
        };
        self.out.line(format!(
            "{who}trainer resumed at step {} (saved at step {}), state {state}",
            step(resumed.resumed_step),
            step(resumed.saved_step)
        ));
        let files = if resumed.files_identical { "yes" } else { "NO" };
        self.out.line(format!(
            "{who}checkpoint files byte-identical after restore: {files}"
        ));
    }
}

/// Whether two directory trees hold the same relative paths with the same bytes. With `own`
/// (a multi-pod rank), `restored` may also hold the other ranks' parts (`rank-<r>/`, restore
/// brings every part by default), which are not compared.
fn dirs_identical(saved: &Path, restored: &Path, own: Option<usize>) -> anyhow::Result<bool> {
    let left = tree(saved)?;
    let mut right = tree(restored)?;
    if let Some(own) = own {
        right.retain(|(_, rel)| !is_other_ranks_part(rel, own));
    }
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

/// `rel` lies in the `rank-<r>/` directory of a rank other than `own`.
fn is_other_ranks_part(rel: &Path, own: usize) -> bool {
    let first = rel.components().next();
    let rank = first.and_then(|c| {
        c.as_os_str()
            .to_str()?
            .strip_prefix("rank-")?
            .parse::<usize>()
            .ok()
    });
    rank.is_some_and(|rank| rank != own)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tree(root: &Path, files: &[(&str, &[u8])]) {
        for (rel, bytes) in files {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }

    #[test]
    fn identical_trees_compare_equal_and_a_changed_byte_does_not() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            write_tree(root, &[("sub/x", b"hello"), ("y", b"")]);
        }
        assert!(dirs_identical(a.path(), b.path(), None).unwrap());
        std::fs::write(b.path().join("sub/x"), b"hellO").unwrap();
        assert!(!dirs_identical(a.path(), b.path(), None).unwrap());
    }

    #[test]
    fn a_rank_compares_its_own_part_and_the_shared_files_not_the_other_ranks_parts() {
        let saved = tempfile::tempdir().unwrap();
        let restored = tempfile::tempdir().unwrap();
        write_tree(saved.path(), &[("rank-1/w", b"one"), ("state.json", b"{}")]);
        write_tree(
            restored.path(),
            &[
                ("rank-0/w", b"zero"),
                ("rank-1/w", b"one"),
                ("state.json", b"{}"),
            ],
        );
        assert!(dirs_identical(saved.path(), restored.path(), Some(1)).unwrap());
        assert!(!dirs_identical(saved.path(), restored.path(), None).unwrap());
        std::fs::write(restored.path().join("rank-1/w"), b"One").unwrap();
        assert!(!dirs_identical(saved.path(), restored.path(), Some(1)).unwrap());
    }
}
