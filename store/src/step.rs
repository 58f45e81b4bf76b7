//! Which training step a checkpoint holds, read from the checkpoint itself.
//!
//! Three sources, in this order:
//! 1. the done marker's content: `step=N` lines (what the Nerve trainer integrations write,
//!    with `reason=notice|periodic`) or a JSON object `{"step": N}`;
//! 2. the newest entry whose name matches the step pattern (`--step-from`; the default covers
//!    `checkpoint-N` (Hugging Face), `step-N` / `step_N`, `global_stepN` (DeepSpeed) and
//!    Lightning's `...step=N.ckpt`), looked for a few levels down;
//! 3. `trainer_state.json`'s `global_step` at the top of the directory (the Hugging Face
//!    Trainer's `save_state()`).
//!
//! Multi-pod generations are named by this step, so every rank agrees on the id without
//! talking to the others; restore compares it to decide whether the local directory is newer.

use std::fs;
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::exclude::Excludes;

/// Entry names that carry a step: `checkpoint-N`, `global_stepN`, `step-N`, `step_N`, and
/// Lightning's `epoch=E-step=N.ckpt`.
pub const DEFAULT_STEP_PATTERN: &str =
    r"^(?:checkpoint-|global_step|step[-_])(\d+)$|(?:^|[-_])step=(\d+)(?:\.ckpt)?$";

/// How deep to look for step-named entries: Lightning's default layout puts checkpoints at
/// `lightning_logs/version_N/checkpoints/` (depth 4 with the file); deeper is not a layout
/// anyone uses, and the walk stays cheap.
pub const MAX_STEP_DEPTH: usize = 4;

/// The file the Hugging Face Trainer writes its progress to (last, in `checkpoint-N/`).
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// A regex whose first matching capture group is the step.
#[derive(Debug, Clone)]
pub struct StepPattern(Regex);

impl Default for StepPattern {
    fn default() -> Self {
        // A constant, checked by the tests below.
        StepPattern(Regex::new(DEFAULT_STEP_PATTERN).expect("the default step pattern is valid"))
    }
}

impl StepPattern {
    /// Parses `--step-from`: a regex with at least one capture group holding the step digits.
    pub fn parse(value: &str) -> Result<StepPattern, String> {
        let regex = Regex::new(value).map_err(|e| format!("not a valid regex: {e}"))?;
        if regex.captures_len() < 2 {
            return Err(format!(
                "`{value}` has no capture group; put the step's digits in one, e.g. ^ckpt_(\\d+)$"
            ));
        }
        Ok(StepPattern(regex))
    }

    /// The step in an entry name, if the name carries one.
    pub fn step_in_name(&self, name: &str) -> Option<u64> {
        let captures = self.0.captures(name)?;
        captures
            .iter()
            .skip(1)
            .flatten()
            .find_map(|group| group.as_str().parse().ok())
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// Where a step was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepSource {
    /// The done marker's content.
    Marker,
    /// The name of an entry, relative to the directory.
    EntryName(String),
    /// `trainer_state.json` at the top of the directory.
    TrainerState,
}

impl std::fmt::Display for StepSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepSource::Marker => f.write_str("the done marker"),
            StepSource::EntryName(path) => write!(f, "the name of {path}"),
            StepSource::TrainerState => write!(f, "{TRAINER_STATE_FILE}'s global_step"),
        }
    }
}

/// A step and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub step: u64,
    pub source: StepSource,
}

/// What a done marker says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MarkerContent {
    pub step: Option<u64>,
    /// `notice` (a save answering a notice), `periodic`, or what the trainer wrote.
    pub reason: Option<String>,
    /// The rank that wrote it, when the trainer says.
    pub rank: Option<u32>,
}

impl MarkerContent {
    /// Reads `key=value` lines or a JSON object; anything else (an empty marker, a timestamp)
    /// says nothing.
    pub fn parse(text: &str) -> MarkerContent {
        let text = text.trim();
        if text.starts_with('{') {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
                return MarkerContent::default();
            };
            return MarkerContent {
                step: value.get("step").and_then(serde_json::Value::as_u64),
                reason: value
                    .get("reason")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
                rank: value
                    .get("rank")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|r| u32::try_from(r).ok()),
            };
        }
        let mut content = MarkerContent::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "step" => content.step = value.parse().ok(),
                "reason" => content.reason = Some(value.to_owned()),
                "rank" => content.rank = value.parse().ok(),
                _ => {}
            }
        }
        content
    }

    /// Reads the marker file; a missing or unreadable one says nothing.
    pub fn read(path: &Path) -> MarkerContent {
        fs::read_to_string(path)
            .map(|text| MarkerContent::parse(&text))
            .unwrap_or_default()
    }

    /// The marker answers a notice (its trainer was asked to save now).
    pub fn is_notice(&self) -> bool {
        self.reason.as_deref() == Some("notice")
    }
}

/// A step-named entry found under a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepEntry {
    pub step: u64,
    /// Relative to the directory, `/`-separated.
    pub path: String,
    pub abs_path: PathBuf,
    pub is_dir: bool,
}

/// Every step-named entry under `dir` (at most [`MAX_STEP_DEPTH`] levels down, excluded paths
/// skipped, symlinks not followed), oldest step first. A step-named directory is not searched
/// further: what is inside it belongs to that step.
pub fn step_entries(dir: &Path, pattern: &StepPattern, excludes: &Excludes) -> Vec<StepEntry> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((abs_dir, rel_dir, depth)) = pending.pop() {
        let Ok(entries) = fs::read_dir(&abs_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let rel = if rel_dir.is_empty() {
                name.clone()
            } else {
                format!("{rel_dir}/{name}")
            };
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let is_dir = file_type.is_dir();
            let skipped = if is_dir {
                excludes.excludes_dir(&rel)
            } else {
                excludes.excludes_file(&rel)
            };
            if skipped || file_type.is_symlink() {
                continue;
            }
            if let Some(step) = pattern.step_in_name(&name) {
                found.push(StepEntry {
                    step,
                    path: rel,
                    abs_path: entry.path(),
                    is_dir,
                });
            } else if is_dir && depth + 1 < MAX_STEP_DEPTH {
                pending.push((entry.path(), rel, depth + 1));
            }
        }
    }
    found.sort_by(|a, b| (a.step, &a.path).cmp(&(b.step, &b.path)));
    found
}

/// The newest step-named entry under `dir`.
pub fn newest_step_entry(
    dir: &Path,
    pattern: &StepPattern,
    excludes: &Excludes,
) -> Option<StepEntry> {
    step_entries(dir, pattern, excludes).pop()
}

/// The step-named entries under `dir` that a generation committing `step` leaves out: those
/// of a newer step, a save the trainer began after the one being committed (the Hugging Face
/// Trainer and Lightning train on after a save), which would otherwise be restored as the
/// newest checkpoint half-written.
///
/// Two exceptions keep an upload whole. No entry holds `step` itself: the names do not count
/// steps the way `step` does (a marker's epoch, a `--step` given by hand), so nothing is left
/// out. DeepSpeed's `latest` names the entry: that save finished, and leaving it out would
/// restore a `latest` naming a tag that is not there.
pub fn newer_step_entries(
    dir: &Path,
    step: u64,
    pattern: &StepPattern,
    excludes: &Excludes,
) -> Vec<StepEntry> {
    let entries = step_entries(dir, pattern, excludes);
    if !entries.iter().any(|entry| entry.step == step) {
        return Vec::new();
    }
    entries
        .into_iter()
        .filter(|entry| entry.step > step && !named_by_deepspeed_latest(entry))
        .collect()
}

/// DeepSpeed's `latest` beside the entry names it (its save completed).
fn named_by_deepspeed_latest(entry: &StepEntry) -> bool {
    matches!(
        crate::layout::judge_checkpoint(&entry.abs_path),
        crate::layout::Evidence::Complete {
            layout: crate::layout::Layout::DeepSpeed,
            ..
        }
    )
}

/// The step of the checkpoint in `dir`, from the three sources in order (see the module docs).
pub fn checkpoint_step(
    dir: &Path,
    marker: Option<&Path>,
    pattern: &StepPattern,
    excludes: &Excludes,
) -> Option<Step> {
    step_from(dir, marker, pattern, excludes, |_| true)
}

/// The step of the newest *whole* checkpoint in `dir`: like [`checkpoint_step`], but a
/// step-named entry whose layout says it is incomplete (a save killed midway,
/// [`crate::layout`]) does not count; the next older one does.
pub fn checkpoint_step_complete(
    dir: &Path,
    marker: Option<&Path>,
    pattern: &StepPattern,
    excludes: &Excludes,
) -> Option<Step> {
    step_from(dir, marker, pattern, excludes, |entry| {
        !matches!(
            crate::layout::judge_checkpoint(&entry.abs_path),
            crate::layout::Evidence::Incomplete { .. }
        )
    })
}

/// How sure a step checkpoint newer than the done marker's step must be to override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrides {
    /// Any checkpoint whose layout does not show it torn. For decisions where erring towards
    /// "newer" is safe: restore keeps the local directory, which is always recoverable.
    NotTorn,
    /// Only a checkpoint whose layout shows it whole. For an upload, where erring towards
    /// "newer" would commit a save the trainer began after marking (its layout unknown).
    Whole,
}

/// The step a directory left behind holds, for a decision made without the trainer's word on
/// *this* save (restore's "is the local checkpoint newer?", a one-shot upload): the marker's
/// step, unless a newer step checkpoint is there that `overrides` accepts. A marker left from an
/// older save (a trainer that marks only its notice saves, then saved on) must not make the
/// checkpoints written since look old.
pub fn settled_step(
    dir: &Path,
    marker: Option<&Path>,
    pattern: &StepPattern,
    excludes: &Excludes,
    overrides: Overrides,
) -> Option<Step> {
    let marked = checkpoint_step_complete(dir, marker, pattern, excludes);
    let held = step_from(dir, None, pattern, excludes, |entry| {
        let evidence = crate::layout::judge_checkpoint(&entry.abs_path);
        match overrides {
            Overrides::NotTorn => !matches!(evidence, crate::layout::Evidence::Incomplete { .. }),
            Overrides::Whole => evidence.is_complete(),
        }
    });
    marked
        .into_iter()
        .chain(held)
        .max_by_key(|found| found.step)
}

/// The three sources in order, step-named entries only where `counts` accepts them.
fn step_from(
    dir: &Path,
    marker: Option<&Path>,
    pattern: &StepPattern,
    excludes: &Excludes,
    counts: impl Fn(&StepEntry) -> bool,
) -> Option<Step> {
    if let Some(step) = marker.and_then(|m| MarkerContent::read(m).step) {
        return Some(Step {
            step,
            source: StepSource::Marker,
        });
    }
    let newest = step_entries(dir, pattern, excludes)
        .into_iter()
        .rev()
        .find(|entry| counts(entry));
    if let Some(entry) = newest {
        return Some(Step {
            step: entry.step,
            source: StepSource::EntryName(entry.path),
        });
    }
    trainer_state_step(&dir.join(TRAINER_STATE_FILE)).map(|step| Step {
        step,
        source: StepSource::TrainerState,
    })
}

/// `global_step` of a `trainer_state.json`.
pub fn trainer_state_step(path: &Path) -> Option<u64> {
    let raw = fs::read(path).ok()?;
    serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()?
        .get("global_step")?
        .as_u64()
}

/// The newest step among relative paths (a manifest's), by their segments' names.
pub fn newest_step_in_paths<'a>(
    paths: impl IntoIterator<Item = &'a str>,
    pattern: &StepPattern,
) -> Option<u64> {
    paths
        .into_iter()
        .flat_map(|path| path.split('/').take(MAX_STEP_DEPTH))
        .filter_map(|segment| pattern.step_in_name(segment))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pattern_reads_the_layouts_trainers_write() {
        let pattern = StepPattern::default();
        for (name, step) in [
            ("checkpoint-1055", Some(1055)),
            ("global_step42", Some(42)),
            ("step-7", Some(7)),
            ("step_8", Some(8)),
            ("epoch=3-step=1200.ckpt", Some(1200)),
            ("step=9.ckpt", Some(9)),
            ("checkpoint-best", None),
            ("last.ckpt", None),
            ("runs", None),
            ("mystep-3", None),
        ] {
            assert_eq!(pattern.step_in_name(name), step, "{name}");
        }
    }

    #[test]
    fn a_custom_pattern_needs_a_capture_group() {
        assert!(StepPattern::parse("^ckpt_[0-9]+$").is_err());
        let pattern = StepPattern::parse(r"^ckpt_(\d+)$").unwrap();
        assert_eq!(pattern.step_in_name("ckpt_12"), Some(12));
        assert_eq!(pattern.step_in_name("checkpoint-12"), None);
    }

    #[test]
    fn reads_markers_as_key_value_lines_or_json() {
        let m = MarkerContent::parse("step=1055\nreason=notice\nrank=2\n");
        assert_eq!(m.step, Some(1055));
        assert!(m.is_notice());
        assert_eq!(m.rank, Some(2));
        let m = MarkerContent::parse(r#"{"step": 12, "reason": "periodic"}"#);
        assert_eq!(m.step, Some(12));
        assert!(!m.is_notice());
        assert_eq!(
            MarkerContent::parse("2026-11-30T03:00:00Z"),
            MarkerContent::default()
        );
        assert_eq!(MarkerContent::parse(""), MarkerContent::default());
    }

    #[test]
    fn a_marker_is_overridden_only_by_a_newer_checkpoint_the_decision_can_trust() {
        let dir = tempfile::tempdir().unwrap();
        let (pattern, excludes) = (StepPattern::default(), Excludes::default());
        let marker = dir.path().join(".nerve-done");
        fs::write(&marker, "step=5\n").unwrap();
        fs::create_dir_all(dir.path().join("checkpoint-5")).unwrap();
        fs::write(dir.path().join("checkpoint-5/trainer_state.json"), "{}").unwrap();
        let settled = |overrides| {
            settled_step(dir.path(), Some(&marker), &pattern, &excludes, overrides).map(|s| s.step)
        };
        // A save begun after the marker, shown torn (weights, no trainer_state.json): neither.
        fs::create_dir_all(dir.path().join("checkpoint-6")).unwrap();
        fs::write(dir.path().join("checkpoint-6/model.bin"), "half").unwrap();
        assert_eq!(settled(Overrides::Whole), Some(5));
        assert_eq!(settled(Overrides::NotTorn), Some(5));
        // One of a layout nothing recognises: lifts restore's "local is newer" (keeping local
        // work is safe), never an upload's step.
        fs::create_dir_all(dir.path().join("step-7")).unwrap();
        fs::write(dir.path().join("step-7/weights.dat"), "?").unwrap();
        assert_eq!(settled(Overrides::Whole), Some(5));
        assert_eq!(settled(Overrides::NotTorn), Some(7));
        // Saves written since the marker, shown whole: they override it either way.
        fs::create_dir_all(dir.path().join("checkpoint-1055")).unwrap();
        fs::write(dir.path().join("checkpoint-1055/trainer_state.json"), "{}").unwrap();
        assert_eq!(settled(Overrides::Whole), Some(1055));
        assert_eq!(settled(Overrides::NotTorn), Some(1055));
    }

    #[test]
    fn the_step_comes_from_the_marker_then_the_newest_entry_then_trainer_state() {
        let dir = tempfile::tempdir().unwrap();
        let (pattern, excludes) = (StepPattern::default(), Excludes::default());
        assert_eq!(checkpoint_step(dir.path(), None, &pattern, &excludes), None);
        fs::write(dir.path().join(TRAINER_STATE_FILE), r#"{"global_step": 5}"#).unwrap();
        assert_eq!(
            checkpoint_step(dir.path(), None, &pattern, &excludes).unwrap(),
            Step {
                step: 5,
                source: StepSource::TrainerState
            }
        );
        for name in ["checkpoint-9", "checkpoint-120", "checkpoint-30"] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        // Logged runs named like steps are not checkpoints.
        fs::create_dir_all(dir.path().join("runs/step-999")).unwrap();
        let step = checkpoint_step(dir.path(), None, &pattern, &excludes).unwrap();
        assert_eq!(step.step, 120);
        assert_eq!(step.source, StepSource::EntryName("checkpoint-120".into()));
        let marker = dir.path().join(".nerve-done");
        fs::write(&marker, "step=121\nreason=notice\n").unwrap();
        let step = checkpoint_step(dir.path(), Some(&marker), &pattern, &excludes).unwrap();
        assert_eq!(
            step,
            Step {
                step: 121,
                source: StepSource::Marker
            }
        );
    }

    #[test]
    fn finds_lightning_checkpoints_a_few_levels_down() {
        let dir = tempfile::tempdir().unwrap();
        let ckpts = dir.path().join("lightning_logs/version_0/checkpoints");
        fs::create_dir_all(&ckpts).unwrap();
        fs::write(ckpts.join("epoch=0-step=50.ckpt"), b"x").unwrap();
        fs::write(ckpts.join("epoch=1-step=100.ckpt"), b"x").unwrap();
        let newest =
            newest_step_entry(dir.path(), &StepPattern::default(), &Excludes::default()).unwrap();
        assert_eq!(newest.step, 100);
        assert_eq!(
            newest.path,
            "lightning_logs/version_0/checkpoints/epoch=1-step=100.ckpt"
        );
        assert!(!newest.is_dir);
    }

    #[test]
    fn only_step_entries_newer_than_the_committed_step_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (pattern, excludes) = (StepPattern::default(), Excludes::default());
        for name in [
            "checkpoint-4",
            "checkpoint-5",
            "checkpoint-6",
            "global_step7",
        ] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        let ckpts = dir.path().join("lightning_logs/version_0/checkpoints");
        fs::create_dir_all(&ckpts).unwrap();
        fs::write(ckpts.join("epoch=0-step=8.ckpt"), b"x").unwrap();
        let left_out: Vec<String> = newer_step_entries(dir.path(), 5, &pattern, &excludes)
            .into_iter()
            .map(|entry| entry.path)
            .collect();
        assert_eq!(
            left_out,
            [
                "checkpoint-6",
                "global_step7",
                "lightning_logs/version_0/checkpoints/epoch=0-step=8.ckpt"
            ]
        );
        assert!(newer_step_entries(dir.path(), 8, &pattern, &excludes).is_empty());
    }

    #[test]
    fn nothing_is_left_out_when_no_entry_holds_the_committed_step() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["checkpoint-1200", "checkpoint-1500"] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        // An epoch in the marker, global steps in the names.
        let left_out =
            newer_step_entries(dir.path(), 3, &StepPattern::default(), &Excludes::default());
        assert!(left_out.is_empty(), "{left_out:?}");
    }

    #[test]
    fn a_newer_deepspeed_tag_that_latest_names_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (pattern, excludes) = (StepPattern::default(), Excludes::default());
        for tag in ["global_step5", "global_step6"] {
            fs::create_dir(dir.path().join(tag)).unwrap();
            fs::write(
                dir.path().join(tag).join("mp_rank_00_model_states.pt"),
                b"x",
            )
            .unwrap();
        }
        fs::write(dir.path().join("latest"), "global_step5").unwrap();
        let left_out = newer_step_entries(dir.path(), 5, &pattern, &excludes);
        assert_eq!(left_out.len(), 1);
        assert_eq!(left_out[0].path, "global_step6");
        // The save of 6 finished before the upload looked: restore must find what latest names.
        fs::write(dir.path().join("latest"), "global_step6").unwrap();
        assert!(newer_step_entries(dir.path(), 5, &pattern, &excludes).is_empty());
    }

    #[test]
    fn reads_the_newest_step_of_a_manifests_paths() {
        let pattern = StepPattern::default();
        let paths = [
            "checkpoint-55/model.safetensors",
            "checkpoint-7/x",
            "runs/a",
        ];
        assert_eq!(newest_step_in_paths(paths, &pattern), Some(55));
        assert_eq!(newest_step_in_paths(["a", "b/c"], &pattern), None);
    }
}
