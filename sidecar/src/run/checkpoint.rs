//! Knowing when the checkpoint is complete, judged on the checkpoint and not on everything
//! under the directory.
//!
//! Three signs, checked every [`POLL_INTERVAL`]:
//! - the done marker appeared or was rewritten after the trainer was signalled (with
//!   `--done-marker` given, only this counts);
//! - otherwise, the newest step checkpoint (`checkpoint-N/`, ...; the whole directory when there
//!   is none) stayed unchanged for the quiet period, no candidate process holds a file of it
//!   open for writing (`/proc/PID/fd` + the `flags` of `/proc/PID/fdinfo/N`), and its layout's
//!   own last-written file is there ([`nerve_store::layout`]). For a layout Nerve does not
//!   recognise, the signalled trainer must still be alive: a trainer that died mid-save leaves a
//!   quiet directory that is torn.
//!
//! Paths excluded from checkpoints (TensorBoard events, logs) never count: a logger holding its
//! file open for the whole run does not block a checkpoint. Everything is bounded by a cut-off
//! derived from the notice's deadline.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nerve_store::exclude::Excludes;
use nerve_store::layout::{Evidence, judge_checkpoint};
use nerve_store::step::{StepPattern, checkpoint_step, newest_step_entry};
use tokio::time::Instant;

/// How often the directory is looked at while waiting: small against the quiet period and the
/// marker latency we aim for (notice to upload start in well under a second with a marker).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Without a marker, how long to wait for the trainer to start writing after the signal before
/// an unchanged directory counts as complete: a trainer finishes its current step first.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `O_ACCMODE` bits of the `flags:` line in `/proc/PID/fdinfo/N` (octal in the file).
const O_ACCMODE: u32 = 0o3;

/// What the sidecar knows about the checkpoint directory it guards.
#[derive(Debug, Clone)]
pub struct Content {
    pub dir: PathBuf,
    /// The done marker (given with `--done-marker`, or the default `.nerve-done`).
    pub marker: PathBuf,
    /// `--done-marker` was given: a notice waits for the marker and nothing else.
    pub marker_only: bool,
    pub quiet_period: Duration,
    pub excludes: Excludes,
    pub step_pattern: StepPattern,
}

impl Content {
    /// The checkpoint completion is judged on: the newest step checkpoint, or the directory.
    pub fn target(&self) -> PathBuf {
        newest_step_entry(&self.dir, &self.step_pattern, &self.excludes)
            .map_or_else(|| self.dir.clone(), |entry| entry.abs_path)
    }

    /// The step of the checkpoint about to be uploaded (blocking). The marker's step when the
    /// marker vouches for this checkpoint (written for it); otherwise the checkpoint was judged
    /// by its files, so the newest step-named entry's comes first, and a marker left from an
    /// earlier save only counts where no name carries a step. The upload leaves out entries
    /// newer than this step, so a stale marker must not decide it.
    pub fn step(&self, marker_vouches: bool) -> Option<u64> {
        if !marker_vouches
            && let Some(entry) = newest_step_entry(&self.dir, &self.step_pattern, &self.excludes)
        {
            return Some(entry.step);
        }
        checkpoint_step(
            &self.dir,
            Some(&self.marker),
            &self.step_pattern,
            &self.excludes,
        )
        .map(|step| step.step)
    }

    /// A snapshot of the checkpoint files under the directory (exclusions applied).
    pub fn snapshot(&self) -> DirSnapshot {
        DirSnapshot::scan(&self.dir, &self.excludes).unwrap_or_default()
    }
}

/// Size and modification time of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub modified: SystemTime,
}

/// Every checkpoint file under a directory, by relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirSnapshot {
    pub files: BTreeMap<PathBuf, FileStamp>,
}

impl DirSnapshot {
    /// Walks `dir` without following links, leaving out what `excludes` excludes; a missing
    /// directory is an empty snapshot. Files that vanish mid-walk are skipped: the next
    /// snapshot sees the directory as it settled.
    pub fn scan(dir: &Path, excludes: &Excludes) -> std::io::Result<DirSnapshot> {
        let mut snapshot = DirSnapshot::default();
        let mut pending = vec![(dir.to_path_buf(), String::new())];
        while let Some((current, rel_dir)) = pending.pop() {
            let entries = match fs::read_dir(&current) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let rel = if rel_dir.is_empty() {
                    name
                } else {
                    format!("{rel_dir}/{name}")
                };
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    if !excludes.excludes_dir(&rel) {
                        pending.push((entry.path(), rel));
                    }
                } else if meta.is_file() && !excludes.excludes_file(&rel) {
                    snapshot.files.insert(
                        PathBuf::from(rel),
                        FileStamp {
                            size: meta.len(),
                            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        },
                    );
                }
            }
        }
        Ok(snapshot)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// Bytes of files that are not in `synced` with the same size and modification time.
    pub fn bytes_not_in(&self, synced: &DirSnapshot) -> u64 {
        self.files
            .iter()
            .filter(|(path, stamp)| synced.files.get(*path) != Some(stamp))
            .map(|(_, stamp)| stamp.size)
            .sum()
    }

    /// The most recent modification of any file.
    pub fn newest(&self) -> Option<SystemTime> {
        self.files.values().map(|f| f.modified).max()
    }

    /// The snapshot without the files under `left_out` (relative paths an upload left out), so
    /// they still count as not in the store.
    pub fn without(mut self, left_out: &[String]) -> DirSnapshot {
        self.files
            .retain(|path, _| !left_out.iter().any(|out| path.starts_with(out)));
        self
    }

    /// The files under `prefix` (relative), for judging one checkpoint of the directory.
    pub fn under(&self, prefix: &Path) -> DirSnapshot {
        DirSnapshot {
            files: self
                .files
                .iter()
                .filter(|(path, _)| path.starts_with(prefix))
                .map(|(path, stamp)| (path.clone(), *stamp))
                .collect(),
        }
    }
}

/// The checkpoint files under `dir` that any of `pids` holds open for writing (excluded paths,
/// such as a logger's event file, do not count).
pub fn open_for_writing(dir: &Path, pids: &[i32], excludes: &Excludes) -> Vec<(i32, PathBuf)> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut found = Vec::new();
    for &pid in pids {
        let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
        // Unreadable (exited, or another user without CAP_SYS_PTRACE): nothing to learn.
        let Ok(entries) = fs::read_dir(&fd_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let Ok(relative) = target.strip_prefix(&dir) else {
                continue;
            };
            if relative
                .to_str()
                .is_some_and(|rel| excludes.excludes_file(rel))
            {
                continue;
            }
            let fdinfo = PathBuf::from(format!("/proc/{pid}/fdinfo")).join(entry.file_name());
            let writable = fs::read_to_string(fdinfo)
                .ok()
                .and_then(|text| parse_fdinfo_flags(&text))
                .is_some_and(|flags| flags & O_ACCMODE != 0);
            if writable {
                found.push((pid, target));
            }
        }
    }
    found
}

/// The `flags:` value of an fdinfo file (octal).
fn parse_fdinfo_flags(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
}

/// Whether any of `pids` is still running (not exited, not a zombie).
pub fn any_alive(pids: &[i32]) -> bool {
    pids.iter().any(|pid| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the command name, which is in parentheses and may hold
                // spaces.
                let after = stat.rsplit_once(')')?.1;
                after.split_whitespace().next().map(str::to_owned)
            })
            .is_some_and(|state| !matches!(state.as_str(), "Z" | "X" | "x"))
    })
}

/// The done marker's state, to tell a new marker from one left by an earlier checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerState(Option<SystemTime>);

impl MarkerState {
    /// No marker file.
    pub const ABSENT: MarkerState = MarkerState(None);

    pub fn read(marker: &Path) -> MarkerState {
        MarkerState(
            fs::metadata(marker)
                .ok()
                .map(|m| m.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
        )
    }

    /// A marker is there and it is not the one `before` saw.
    pub fn is_new_since(self, before: MarkerState) -> bool {
        self.0.is_some() && self != before
    }

    pub fn modified(self) -> Option<SystemTime> {
        self.0
    }
}

/// How the checkpoint was judged complete, or why waiting stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The done marker appeared.
    Marker,
    /// Quiet for the quiet period, nothing open for writing, and the layout's evidence.
    Quiet(Evidence),
    /// The trainer is gone and the checkpoint cannot be shown whole: never committed.
    Torn(String),
    /// The cut-off came first: the checkpoint is not known to be complete.
    CutOff,
}

impl Completion {
    pub fn as_str(&self) -> &'static str {
        match self {
            Completion::Marker => "marker",
            Completion::Quiet(_) => "quiet",
            Completion::Torn(_) => "torn",
            Completion::CutOff => "cut-off",
        }
    }

    pub fn is_complete(&self) -> bool {
        matches!(self, Completion::Marker | Completion::Quiet(_))
    }
}

/// The trainer processes a wait is about.
#[derive(Debug, Clone, Default)]
pub struct Writers {
    /// Every candidate process: files they hold open for writing are being written.
    pub pids: Vec<i32>,
    /// The processes that were signalled: the ones expected to write the checkpoint.
    pub signalled: Vec<i32>,
}

/// Judges the checkpoint as it is now, once the directory is quiet and nothing writes to it:
/// `Some` when done (complete or torn), `None` when the trainer that is still alive may yet
/// complete it.
pub fn judge_quiet_checkpoint(target: &Path, trainer_alive: bool) -> Option<Completion> {
    let evidence = judge_checkpoint(target);
    match evidence {
        Evidence::Complete { .. } => Some(Completion::Quiet(evidence)),
        Evidence::Unrecognised if trainer_alive => Some(Completion::Quiet(evidence)),
        Evidence::Unrecognised => Some(Completion::Torn(format!(
            "the trainer exited after the signal and {} has no recognised layout to show it is \
             whole (write a done marker from the trainer, see docs/trainers.md)",
            target.display()
        ))),
        Evidence::Incomplete { .. } if !trainer_alive => Some(Completion::Torn(format!(
            "the trainer exited after the signal and {} is a {evidence}: its save did not finish",
            target.display()
        ))),
        Evidence::Incomplete { .. } => None,
    }
}

/// Waits until the checkpoint in `content.dir` is complete or `cutoff(snapshot)` passes.
///
/// `marker_before` is the marker's state before the trainer was signalled. `cutoff` gets each
/// fresh snapshot so it can re-estimate the upload time as the checkpoint grows.
pub async fn wait_for_checkpoint(
    content: &Content,
    marker_before: MarkerState,
    writers: &Writers,
    mut cutoff: impl FnMut(&DirSnapshot) -> Instant,
) -> Completion {
    let started = Instant::now();
    let mut previous: Option<(PathBuf, DirSnapshot)> = None;
    let mut last_change = started;
    let mut changed_since_signal = false;
    loop {
        let look = content.clone();
        let (target, snapshot) = tokio::task::spawn_blocking(move || {
            let target = look.target();
            let snapshot = look.snapshot();
            (target, snapshot)
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        if MarkerState::read(&content.marker).is_new_since(marker_before) {
            return Completion::Marker;
        }
        if !content.marker_only {
            if previous
                .as_ref()
                .is_some_and(|p| *p != (target.clone(), snapshot.clone()))
            {
                last_change = now;
                changed_since_signal = true;
            }
            let started_writing = changed_since_signal
                || writers.signalled.is_empty()
                || now - started >= START_TIMEOUT
                || !any_alive(&writers.signalled);
            if started_writing && now - last_change >= content.quiet_period {
                let writing = open_for_writing(&target, &writers.pids, &content.excludes);
                if writing.is_empty() {
                    let alive = writers.signalled.is_empty() || any_alive(&writers.signalled);
                    if let Some(done) = judge_quiet_checkpoint(&target, alive) {
                        return done;
                    }
                } else {
                    tracing::debug!(?writing, "quiet, but files are still open for writing");
                }
            }
        }
        if now >= cutoff(&snapshot) {
            return Completion::CutOff;
        }
        previous = Some((target, snapshot));
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn content(dir: &Path, marker_only: bool) -> Content {
        Content {
            dir: dir.to_path_buf(),
            marker: dir.join("DONE"),
            marker_only,
            quiet_period: Duration::from_millis(300),
            excludes: Excludes::default(),
            step_pattern: StepPattern::default(),
        }
    }

    #[test]
    fn reads_the_access_mode_from_fdinfo_flags() {
        assert_eq!(
            parse_fdinfo_flags("pos:\t0\nflags:\t0100001\nmnt_id:\t30\n"),
            Some(0o100001)
        );
        assert_eq!(parse_fdinfo_flags("pos:\t0\n"), None);
    }

    #[test]
    fn finds_a_file_this_process_holds_open_for_writing_and_not_a_log_or_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let excludes = Excludes::default();
        let mut writing = fs::File::create(dir.path().join("optimizer.pt")).unwrap();
        writing.write_all(b"partial").unwrap();
        let _log = fs::File::create(dir.path().join("train.log")).unwrap();
        let found = open_for_writing(dir.path(), &[me], &excludes);
        assert_eq!(found.len(), 1);
        assert!(found[0].1.ends_with("optimizer.pt"));
        drop(writing);
        let _reading = fs::File::open(dir.path().join("optimizer.pt")).unwrap();
        assert!(open_for_writing(dir.path(), &[me], &excludes).is_empty());
    }

    #[test]
    fn a_marker_left_from_an_earlier_save_does_not_decide_the_step_of_a_quiet_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let content = content(dir.path(), false);
        fs::write(&content.marker, "step=5\nreason=notice\n").unwrap();
        fs::create_dir(dir.path().join("checkpoint-5")).unwrap();
        fs::create_dir(dir.path().join("checkpoint-10")).unwrap();
        assert_eq!(content.step(true), Some(5), "the marker vouches");
        assert_eq!(content.step(false), Some(10), "judged by its files");
        fs::remove_dir(dir.path().join("checkpoint-5")).unwrap();
        fs::remove_dir(dir.path().join("checkpoint-10")).unwrap();
        assert_eq!(content.step(false), Some(5), "no name carries a step");
    }

    #[test]
    fn files_an_upload_left_out_stay_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        for path in ["checkpoint-5/a", "checkpoint-6/a", "checkpoint-60/a"] {
            fs::create_dir_all(dir.path().join(path).parent().unwrap()).unwrap();
            fs::write(dir.path().join(path), b"x").unwrap();
        }
        let snapshot = DirSnapshot::scan(dir.path(), &Excludes::default()).unwrap();
        let synced = snapshot.clone().without(&["checkpoint-6".to_owned()]);
        let kept: Vec<_> = synced.files.keys().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(kept, ["checkpoint-5/a", "checkpoint-60/a"]);
        assert_eq!(snapshot.bytes_not_in(&synced), 1);
    }

    #[test]
    fn counts_only_checkpoint_bytes_that_changed_since_the_synced_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let excludes = Excludes::default();
        fs::write(dir.path().join("a"), vec![1u8; 10]).unwrap();
        let synced = DirSnapshot::scan(dir.path(), &excludes).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b"), vec![2u8; 7]).unwrap();
        fs::create_dir(dir.path().join("runs")).unwrap();
        fs::write(dir.path().join("runs/events.out.tfevents.1"), vec![3u8; 99]).unwrap();
        let now = DirSnapshot::scan(dir.path(), &excludes).unwrap();
        assert_eq!(now.total_bytes(), 17);
        assert_eq!(now.bytes_not_in(&synced), 7);
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(any_alive(&[std::process::id() as i32]));
        assert!(!any_alive(&[pid]));
    }

    #[tokio::test]
    async fn a_marker_left_from_before_the_signal_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let content = content(dir.path(), true);
        fs::write(&content.marker, "old").unwrap();
        let before = MarkerState::read(&content.marker);
        let writers = Writers::default();
        let deadline = Instant::now() + Duration::from_millis(400);
        let outcome = wait_for_checkpoint(&content, before, &writers, |_| deadline).await;
        assert_eq!(outcome, Completion::CutOff);
        fs::remove_file(&content.marker).unwrap();
        let writer = tokio::spawn({
            let marker = content.marker.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                fs::write(marker, "new").unwrap();
            }
        });
        let far = Instant::now() + Duration::from_secs(60);
        let outcome = wait_for_checkpoint(&content, before, &writers, |_| far).await;
        writer.await.unwrap();
        assert_eq!(outcome, Completion::Marker);
    }

    #[tokio::test]
    async fn a_log_held_open_beside_a_finished_checkpoint_does_not_hold_it_up() {
        let dir = tempfile::tempdir().unwrap();
        let content = content(dir.path(), false);
        let checkpoint = dir.path().join("checkpoint-3");
        fs::create_dir(&checkpoint).unwrap();
        fs::write(checkpoint.join("model.safetensors"), b"m").unwrap();
        fs::write(checkpoint.join("trainer_state.json"), b"{}").unwrap();
        fs::create_dir_all(dir.path().join("runs/today")).unwrap();
        let mut log =
            fs::File::create(dir.path().join("runs/today/events.out.tfevents.1")).unwrap();
        let writers = Writers {
            pids: vec![std::process::id() as i32],
            signalled: vec![],
        };
        let logging = tokio::spawn(async move {
            for _ in 0..20 {
                log.write_all(b"scalar").unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let far = Instant::now() + Duration::from_secs(30);
        let outcome = wait_for_checkpoint(&content, MarkerState::ABSENT, &writers, |_| far).await;
        assert!(
            matches!(outcome, Completion::Quiet(Evidence::Complete { .. })),
            "{outcome:?}"
        );
        logging.abort();
    }

    #[tokio::test]
    async fn a_torn_checkpoint_of_a_trainer_that_died_is_never_complete() {
        let dir = tempfile::tempdir().unwrap();
        let content = content(dir.path(), false);
        let checkpoint = dir.path().join("checkpoint-58");
        fs::create_dir(&checkpoint).unwrap();
        fs::write(checkpoint.join("model.safetensors"), b"whole").unwrap();
        fs::write(checkpoint.join("optimizer.pt"), b"trunc").unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let pid = dead.id() as i32;
        dead.wait().unwrap();
        let writers = Writers {
            pids: vec![pid],
            signalled: vec![pid],
        };
        let far = Instant::now() + Duration::from_secs(30);
        let outcome = wait_for_checkpoint(&content, MarkerState::ABSENT, &writers, |_| far).await;
        let Completion::Torn(why) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(why.contains("without trainer_state.json"), "{why}");
    }
}
