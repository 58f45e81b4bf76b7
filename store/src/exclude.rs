//! What under the checkpoint directory is not checkpoint content.
//!
//! Trainers log next to their checkpoints: the Hugging Face Trainer writes TensorBoard events
//! to `output_dir/runs/<date>_<host>/`, Lightning's default logger writes
//! `lightning_logs/version_N/events.*` beside `lightning_logs/version_N/checkpoints/`, W&B keeps
//! `wandb/`. Those files stay open for writing for the whole run, so judging a checkpoint by
//! "nothing under the directory is being written" would wait forever, and uploading them would
//! race every log line. Excluded paths are left out of completion, upload and restore (restore
//! keeps the local ones where they are).
//!
//! Patterns are globs on the `/`-separated path relative to the directory (`*` stays within one
//! segment, `**` crosses them). Top-level names starting with [`RESERVED_PREFIX`] (restore's
//! staging, the default done marker) are never checkpoint content either.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Top-level names Nerve itself uses inside a checkpoint directory (restore's staging and swap
/// directories, the done marker `.nerve-done`); never part of a checkpoint.
pub const RESERVED_PREFIX: &str = ".nerve-";

/// Excluded unless the user turns the defaults off: what the common trainers and loggers write
/// beside their checkpoints and keep open.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    // TensorBoard event files, wherever a logger puts them.
    "**/events.out.tfevents.*",
    // The Hugging Face Trainer's default logging_dir (TensorBoard, one folder per run).
    "runs/**",
    // Lightning's default logger; its checkpoints live beside these files, so only the events go.
    "lightning_logs/**/events.*",
    // Weights & Biases run directories.
    "wandb/**",
    // Plain log files.
    "**/*.log",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExcludeError {
    #[error(
        "exclude pattern `{pattern}` {reason}; patterns are relative to --dir, e.g. `runs/**` or `**/*.log`"
    )]
    Invalid { pattern: String, reason: String },
}

/// The exclude patterns of one checkpoint directory.
#[derive(Debug, Clone)]
pub struct Excludes {
    /// Every pattern, matched against file paths.
    files: GlobSet,
    /// Patterns ending in `/**`, without that suffix: a directory matching one is skipped whole.
    dirs: GlobSet,
    patterns: Vec<String>,
}

impl Default for Excludes {
    /// The default patterns.
    fn default() -> Self {
        Excludes::new(&[], true).unwrap_or_else(|_| Excludes::nothing())
    }
}

impl Excludes {
    /// `extra` patterns (the user's), plus [`DEFAULT_EXCLUDES`] when `defaults` is set.
    pub fn new(extra: &[String], defaults: bool) -> Result<Excludes, ExcludeError> {
        let mut patterns: Vec<String> = Vec::new();
        if defaults {
            patterns.extend(DEFAULT_EXCLUDES.iter().map(|p| (*p).to_owned()));
        }
        patterns.extend(
            extra
                .iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty()),
        );
        let mut files = GlobSetBuilder::new();
        let mut dirs = GlobSetBuilder::new();
        for pattern in &patterns {
            check_pattern(pattern)?;
            files.add(glob(pattern)?);
            if let Some(dir) = pattern.strip_suffix("/**") {
                dirs.add(glob(dir)?);
            }
        }
        let build = |builder: GlobSetBuilder| {
            builder.build().map_err(|e| ExcludeError::Invalid {
                pattern: patterns.join(","),
                reason: e.to_string(),
            })
        };
        Ok(Excludes {
            files: build(files)?,
            dirs: build(dirs)?,
            patterns,
        })
    }

    /// Nothing excluded but Nerve's own reserved names.
    pub fn nothing() -> Excludes {
        Excludes {
            files: GlobSet::empty(),
            dirs: GlobSet::empty(),
            patterns: Vec::new(),
        }
    }

    /// The patterns in force, defaults first.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether the file at `path` (relative, `/`-separated) is not checkpoint content.
    pub fn excludes_file(&self, path: &str) -> bool {
        is_reserved(path) || self.files.is_match(path)
    }

    /// Whether everything under the directory at `path` is excluded (so a walk can skip it).
    pub fn excludes_dir(&self, path: &str) -> bool {
        is_reserved(path) || self.dirs.is_match(path)
    }
}

/// Top-level `.nerve-*` names.
pub fn is_reserved(path: &str) -> bool {
    path.split('/')
        .next()
        .is_some_and(|first| first.starts_with(RESERVED_PREFIX))
}

fn check_pattern(pattern: &str) -> Result<(), ExcludeError> {
    let reason = if pattern.starts_with('/') {
        Some("is absolute")
    } else if pattern.split('/').any(|s| s == "..") {
        Some("climbs out with `..`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ExcludeError::Invalid {
            pattern: pattern.to_owned(),
            reason: reason.to_owned(),
        }),
        None => Ok(()),
    }
}

fn glob(pattern: &str) -> Result<Glob, ExcludeError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| ExcludeError::Invalid {
            pattern: pattern.to_owned(),
            reason: format!("is not a glob ({})", e.kind()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_exclude_what_trainers_log_beside_their_checkpoints() {
        let excludes = Excludes::default();
        for logged in [
            "runs/Nov30_03-29-15_host/events.out.tfevents.1764473355.host.123.0",
            "lightning_logs/version_0/events.out.tfevents.1.host",
            "lightning_logs/version_3/events.custom",
            "wandb/run-20261130/files/output.log",
            "train.log",
            "checkpoint-9/events.out.tfevents.1.x",
            ".nerve-done",
        ] {
            assert!(excludes.excludes_file(logged), "{logged}");
        }
        for content in [
            "checkpoint-9/model.safetensors",
            "checkpoint-9/trainer_state.json",
            "lightning_logs/version_0/checkpoints/epoch=0-step=10.ckpt",
            "lightning_logs/version_0/hparams.yaml",
            "runsheet.json",
            "sub/.nerve-done",
        ] {
            assert!(!excludes.excludes_file(content), "{content}");
        }
        assert!(excludes.excludes_dir("runs"));
        assert!(excludes.excludes_dir("wandb"));
        assert!(!excludes.excludes_dir("lightning_logs"));
        assert!(!excludes.excludes_dir("checkpoint-9"));
    }

    #[test]
    fn user_patterns_add_to_the_defaults_or_replace_them() {
        let both = Excludes::new(&["scratch/**".into(), "*.tmp".into()], true).unwrap();
        assert!(both.excludes_file("scratch/a/b"));
        assert!(both.excludes_file("x.tmp"));
        assert!(
            !both.excludes_file("sub/x.tmp"),
            "`*` stays within one segment"
        );
        assert!(both.excludes_file("train.log"));
        let only = Excludes::new(&["*.tmp".into()], false).unwrap();
        assert!(!only.excludes_file("train.log"));
        assert_eq!(only.patterns(), ["*.tmp"]);
    }

    #[test]
    fn refuses_patterns_that_could_not_name_a_path_inside_the_directory() {
        for bad in ["/etc/**", "../x", "a/../../b", "[unclosed"] {
            let err = Excludes::new(&[bad.into()], false).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
