//! Whether a checkpoint on disk is whole, judged by the file its layout writes last.
//!
//! A trainer killed mid-save (a drain's SIGTERM to a trainer without a handler, the OOM killer)
//! leaves a directory that looks quiet: some files whole, one truncated, the last ones missing.
//! Quiet alone must not make that the newest generation. The layouts trainers write each end
//! with a file that only a finished save leaves behind:
//!
//! | layout | recognised by | complete when |
//! |---|---|---|
//! | Hugging Face Trainer `checkpoint-N/` | `trainer_state.json`, `training_args.bin`, `scheduler.pt`, `rng_state*.pth`, or a `checkpoint-N` name with model or optimizer files | `trainer_state.json` is there (written after the model, optimizer and RNG state) |
//! | torch.distributed.checkpoint | `*.distcp` files | `.metadata` is there (the coordinator writes it after every rank's files) |
//! | DeepSpeed `global_stepN/` | `*_model_states.pt` / `*_optim_states.pt` | the parent's `latest` file names the directory (written after the save) |
//! | Lightning / `torch.save` `*.ckpt` | the file name | the zip archive ends with its end-of-central-directory record |
//!
//! Anything else is unrecognised: the caller decides (a done marker is the reliable way).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::step::TRAINER_STATE_FILE;

/// torch.distributed.checkpoint's metadata file, written last by the coordinator rank.
pub const DCP_METADATA_FILE: &str = ".metadata";
/// DeepSpeed's pointer to the newest tag, written after a save completes.
pub const DEEPSPEED_LATEST_FILE: &str = "latest";
/// A zip archive's end-of-central-directory record: its signature and fixed size.
const ZIP_EOCD_SIGNATURE: [u8; 4] = *b"PK\x05\x06";
const ZIP_EOCD_LEN: usize = 22;
/// The record may be followed by a comment of up to 65,535 bytes.
const ZIP_TAIL_LEN: u64 = ZIP_EOCD_LEN as u64 + 65_535;

/// A checkpoint layout Nerve recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    HuggingFace,
    TorchDistributed,
    DeepSpeed,
    TorchSave,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::HuggingFace => "Hugging Face Trainer",
            Layout::TorchDistributed => "torch.distributed.checkpoint",
            Layout::DeepSpeed => "DeepSpeed",
            Layout::TorchSave => "torch.save archive",
        }
    }
}

/// What a checkpoint's layout says about whether it is whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// The layout's last-written file is there.
    Complete { layout: Layout, file: String },
    /// A recognised layout whose last file is missing: still being written, or torn.
    Incomplete { layout: Layout, missing: String },
    /// No layout recognised.
    Unrecognised,
}

impl Evidence {
    pub fn is_complete(&self) -> bool {
        matches!(self, Evidence::Complete { .. })
    }
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Evidence::Complete { layout, file } => {
                write!(f, "{} checkpoint with its {file}", layout.as_str())
            }
            Evidence::Incomplete { layout, missing } => {
                write!(f, "{} checkpoint without {missing}", layout.as_str())
            }
            Evidence::Unrecognised => f.write_str("no recognised checkpoint layout"),
        }
    }
}

/// Judges the checkpoint at `path` (a checkpoint directory, or a `*.ckpt` file).
pub fn judge_checkpoint(path: &Path) -> Evidence {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".ckpt") {
        return judge_torch_save(path);
    }
    let Ok(entries) = fs::read_dir(path) else {
        return Evidence::Unrecognised;
    };
    let names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    let has = |wanted: &str| names.iter().any(|n| n == wanted);
    let any = |test: &dyn Fn(&str) -> bool| names.iter().any(|n| test(n));

    let hugging_face = has(TRAINER_STATE_FILE)
        || has("training_args.bin")
        || has("scheduler.pt")
        || any(&|n| n.starts_with("rng_state") && n.ends_with(".pth"))
        || (name.starts_with("checkpoint-")
            && any(&|n| n.ends_with(".safetensors") || n.ends_with(".bin") || n == "optimizer.pt"));
    if hugging_face {
        return present_or_missing(
            Layout::HuggingFace,
            has(TRAINER_STATE_FILE),
            TRAINER_STATE_FILE,
        );
    }
    if any(&|n| n.ends_with(".distcp")) {
        return present_or_missing(
            Layout::TorchDistributed,
            has(DCP_METADATA_FILE),
            DCP_METADATA_FILE,
        );
    }
    if any(&|n| n.ends_with("_model_states.pt") || n.ends_with("_optim_states.pt")) {
        let latest = path
            .parent()
            .map(|parent| parent.join(DEEPSPEED_LATEST_FILE))
            .and_then(|latest| fs::read_to_string(latest).ok());
        let named = latest.is_some_and(|tag| tag.trim() == name);
        return present_or_missing(
            Layout::DeepSpeed,
            named,
            &format!("a `{DEEPSPEED_LATEST_FILE}` file beside it naming {name}"),
        );
    }
    Evidence::Unrecognised
}

fn present_or_missing(layout: Layout, present: bool, file: &str) -> Evidence {
    if present {
        Evidence::Complete {
            layout,
            file: file.to_owned(),
        }
    } else {
        Evidence::Incomplete {
            layout,
            missing: file.to_owned(),
        }
    }
}

/// `torch.save` writes a zip archive; a whole one ends with its end-of-central-directory
/// record (and the comment it announces), a truncated one does not.
fn judge_torch_save(path: &Path) -> Evidence {
    let whole = zip_is_whole(path).unwrap_or(false);
    present_or_missing(
        Layout::TorchSave,
        whole,
        "the zip end-of-central-directory record",
    )
}

fn zip_is_whole(path: &Path) -> std::io::Result<bool> {
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let tail_len = len.min(ZIP_TAIL_LEN);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(usize::try_from(tail_len).unwrap_or(0));
    file.take(tail_len).read_to_end(&mut tail)?;
    // The last record whose announced comment length reaches exactly the end of the file.
    let whole = (0..tail.len().saturating_sub(ZIP_EOCD_LEN - 1))
        .rev()
        .filter(|&at| tail[at..].starts_with(&ZIP_EOCD_SIGNATURE))
        .any(|at| {
            let comment = usize::from(u16::from_le_bytes([tail[at + 20], tail[at + 21]]));
            at + ZIP_EOCD_LEN + comment == tail.len()
        });
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(name: &str, files: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(name);
        fs::create_dir(&dir).unwrap();
        for file in files {
            fs::write(dir.join(file), b"x").unwrap();
        }
        (root, dir)
    }

    #[test]
    fn a_hugging_face_checkpoint_is_whole_only_with_its_trainer_state() {
        let (_root, torn) = dir_with("checkpoint-58", &["model.safetensors", "optimizer.pt"]);
        assert_eq!(
            judge_checkpoint(&torn),
            Evidence::Incomplete {
                layout: Layout::HuggingFace,
                missing: TRAINER_STATE_FILE.into()
            }
        );
        fs::write(torn.join(TRAINER_STATE_FILE), b"{}").unwrap();
        assert!(judge_checkpoint(&torn).is_complete());
    }

    #[test]
    fn a_distributed_checkpoint_is_whole_only_with_its_metadata() {
        let (_root, dir) = dir_with("step-3", &["__0_0.distcp", "__1_0.distcp"]);
        assert!(!judge_checkpoint(&dir).is_complete());
        fs::write(dir.join(DCP_METADATA_FILE), b"m").unwrap();
        assert!(judge_checkpoint(&dir).is_complete());
    }

    #[test]
    fn a_deepspeed_tag_is_whole_once_latest_names_it() {
        let (root, dir) = dir_with(
            "global_step9",
            &[
                "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            ],
        );
        assert!(!judge_checkpoint(&dir).is_complete());
        fs::write(root.path().join("latest"), "global_step8").unwrap();
        assert!(!judge_checkpoint(&dir).is_complete());
        fs::write(root.path().join("latest"), "global_step9\n").unwrap();
        assert!(judge_checkpoint(&dir).is_complete());
    }

    #[test]
    fn a_torch_save_archive_is_whole_only_with_its_end_record() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("epoch=0-step=10.ckpt");
        let mut archive = vec![b'P', b'K', 3, 4];
        archive.extend(std::iter::repeat_n(7u8, 1000));
        let mut end = ZIP_EOCD_SIGNATURE.to_vec();
        end.extend([0u8; ZIP_EOCD_LEN - 4]);
        fs::write(&path, [archive.clone(), end.clone()].concat()).unwrap();
        assert!(judge_checkpoint(&path).is_complete());
        fs::write(&path, &archive).unwrap();
        assert!(!judge_checkpoint(&path).is_complete());
        // A record announcing a comment the file does not hold is not the end.
        let mut cut = end.clone();
        cut[20] = 9;
        fs::write(&path, [archive, cut].concat()).unwrap();
        assert!(!judge_checkpoint(&path).is_complete());
    }

    #[test]
    fn other_directories_are_unrecognised() {
        let (_root, dir) = dir_with("checkpoint-1", &["weights.npz"]);
        assert_eq!(judge_checkpoint(&dir), Evidence::Unrecognised);
    }
}
