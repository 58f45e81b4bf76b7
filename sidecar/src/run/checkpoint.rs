//! Knowing when the checkpoint is complete.
//!
//! Either the `--done-marker` file appears (or is rewritten) after the trainer was signalled, or,
//! without a marker, nothing under the directory changed for a quiet period and no candidate
//! process holds a file there open for writing (`/proc/PID/fd` + the `flags` of
//! `/proc/PID/fdinfo/N`). Both are bounded by a cut-off derived from the notice's deadline.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// How often the directory is looked at while waiting: small against the quiet period and the
/// marker latency we aim for (notice to upload start in well under a second with a marker).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Without a marker, how long to wait for the trainer to start writing after the signal before
/// an unchanged directory counts as complete: a trainer finishes its current step first.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `O_ACCMODE` bits of the `flags:` line in `/proc/PID/fdinfo/N` (octal in the file).
const O_ACCMODE: u32 = 0o3;

/// Size and modification time of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub modified: SystemTime,
}

/// Every regular file under a directory, by relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirSnapshot {
    pub files: BTreeMap<PathBuf, FileStamp>,
}

impl DirSnapshot {
    /// Walks `dir`; a missing directory is an empty snapshot. Files that vanish mid-walk are
    /// skipped: the next snapshot sees the directory as it settled.
    pub fn scan(dir: &Path) -> std::io::Result<DirSnapshot> {
        let mut snapshot = DirSnapshot::default();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(current) = pending.pop() {
            let entries = match fs::read_dir(&current) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let path = entry.path();
                if meta.is_dir() {
                    pending.push(path);
                } else if meta.is_file() {
                    let relative = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                    snapshot.files.insert(
                        relative,
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
}

/// The files under `dir` that any of `pids` holds open for writing.
pub fn open_for_writing(dir: &Path, pids: &[i32]) -> Vec<(i32, PathBuf)> {
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
            if !target.starts_with(&dir) {
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
}

/// How the checkpoint was judged complete, or why waiting stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The done marker appeared.
    Marker,
    /// Quiet for the quiet period, nothing open for writing.
    Quiet,
    /// The cut-off came first: the checkpoint is not known to be complete.
    CutOff,
}

impl Completion {
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Marker => "marker",
            Completion::Quiet => "quiet",
            Completion::CutOff => "cut-off",
        }
    }
}

/// What to wait for.
#[derive(Debug, Clone)]
pub struct CompletionRule {
    /// Absolute path of the done marker, if the trainer writes one.
    pub marker: Option<PathBuf>,
    pub quiet_period: Duration,
}

/// Waits until the checkpoint in `dir` is complete or `cutoff(snapshot)` passes.
///
/// `marker_before` is the marker's state before the trainer was signalled; `signalled` says
/// whether any process was signalled (when none was, there is nothing to wait for but quiet).
/// `writers` are the processes whose open files count; `cutoff` gets each fresh snapshot so it
/// can re-estimate the upload time as the checkpoint grows.
pub async fn wait_for_checkpoint(
    dir: &Path,
    rule: &CompletionRule,
    marker_before: MarkerState,
    signalled: bool,
    writers: &[i32],
    mut cutoff: impl FnMut(&DirSnapshot) -> Instant,
) -> Completion {
    let started = Instant::now();
    let mut previous: Option<DirSnapshot> = None;
    let mut last_change = started;
    let mut changed_since_signal = false;
    loop {
        let scan_dir = dir.to_path_buf();
        let snapshot = tokio::task::spawn_blocking(move || DirSnapshot::scan(&scan_dir))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let now = Instant::now();
        if let Some(marker) = &rule.marker {
            let state = MarkerState::read(marker);
            if state.0.is_some() && state != marker_before {
                return Completion::Marker;
            }
        } else {
            if previous.as_ref().is_some_and(|p| *p != snapshot) {
                last_change = now;
                changed_since_signal = true;
            }
            let started_writing =
                changed_since_signal || !signalled || now - started >= START_TIMEOUT;
            if started_writing && now - last_change >= rule.quiet_period {
                let writing = open_for_writing(dir, writers);
                if writing.is_empty() {
                    return Completion::Quiet;
                }
                tracing::debug!(?writing, "quiet, but files are still open for writing");
            }
        }
        if now >= cutoff(&snapshot) {
            return Completion::CutOff;
        }
        previous = Some(snapshot);
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The training step of the newest `checkpoint-N/` holding a `trainer_state.json` with
/// `global_step`, as the Hugging Face Trainer writes it.
pub fn read_training_step(dir: &Path) -> Option<u64> {
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(best, _)| n > *best) {
            newest = Some((n, entry.path()));
        }
    }
    let (n, path) = newest?;
    let state = fs::read(path.join("trainer_state.json")).ok();
    let step = state
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .and_then(|v| v.get("global_step").and_then(serde_json::Value::as_u64));
    Some(step.unwrap_or(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_the_access_mode_from_fdinfo_flags() {
        assert_eq!(
            parse_fdinfo_flags("pos:\t0\nflags:\t0100001\nmnt_id:\t30\n"),
            Some(0o100001)
        );
        assert_eq!(parse_fdinfo_flags("pos:\t0\n"), None);
    }

    #[test]
    fn finds_a_file_this_process_holds_open_for_writing_and_not_one_open_for_reading() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let mut writing = fs::File::create(dir.path().join("optimizer.pt")).unwrap();
        writing.write_all(b"partial").unwrap();
        let found = open_for_writing(dir.path(), &[me]);
        assert_eq!(found.len(), 1);
        assert!(found[0].1.ends_with("optimizer.pt"));
        drop(writing);
        let _reading = fs::File::open(dir.path().join("optimizer.pt")).unwrap();
        assert!(open_for_writing(dir.path(), &[me]).is_empty());
    }

    #[test]
    fn counts_only_bytes_that_changed_since_the_synced_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![1u8; 10]).unwrap();
        let synced = DirSnapshot::scan(dir.path()).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b"), vec![2u8; 7]).unwrap();
        let now = DirSnapshot::scan(dir.path()).unwrap();
        assert_eq!(now.total_bytes(), 17);
        assert_eq!(now.bytes_not_in(&synced), 7);
    }

    #[test]
    fn reads_the_step_of_the_newest_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        for (name, step) in [("checkpoint-9", 9), ("checkpoint-120", 120)] {
            fs::create_dir(dir.path().join(name)).unwrap();
            fs::write(
                dir.path().join(name).join("trainer_state.json"),
                format!("{{\"global_step\": {step}}}"),
            )
            .unwrap();
        }
        assert_eq!(read_training_step(dir.path()), Some(120));
    }

    #[tokio::test]
    async fn a_marker_left_from_before_the_signal_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("DONE");
        fs::write(&marker, "old").unwrap();
        let before = MarkerState::read(&marker);
        let rule = CompletionRule {
            marker: Some(marker.clone()),
            quiet_period: Duration::from_secs(1),
        };
        let deadline = Instant::now() + Duration::from_millis(400);
        let outcome = wait_for_checkpoint(dir.path(), &rule, before, true, &[], |_| deadline).await;
        assert_eq!(outcome, Completion::CutOff);
        fs::remove_file(&marker).unwrap();
        let writer = tokio::spawn({
            let marker = marker.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                fs::write(marker, "new").unwrap();
            }
        });
        let far = Instant::now() + Duration::from_secs(60);
        let outcome = wait_for_checkpoint(dir.path(), &rule, before, true, &[], |_| far).await;
        writer.await.unwrap();
        assert_eq!(outcome, Completion::Marker);
    }
}
