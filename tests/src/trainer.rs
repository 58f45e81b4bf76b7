//! The test trainer's training state and its checkpoints in Hugging Face `checkpoint-N/` layout.
//!
//! The state is deterministic: the bytes of every file at step `s` follow from the seed and `s`
//! alone, so a resumed trainer can check that what it loaded is exactly what a trainer at that
//! step holds, and two runs can be compared by a digest. Nothing is held in memory: files are
//! generated and hashed in fixed-size chunks, so a 2 GiB state costs a few MiB of memory.
//!
//! Layout of `checkpoint-N/`:
//! - `model-0000i-of-0000n.safetensors`: `shards` model shards of `size / 2 / shards` bytes each;
//!   the first `frozen_shards` never change (a frozen base), the others change every step;
//! - `optimizer.pt`: `size / 2` bytes, changes every step;
//! - `rng_state.pth`, `scheduler.pt`, `config.json`, `trainer_state.json` (with `global_step`).

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Chunk size for generating and hashing state: large enough to be fast, small enough that
/// memory does not grow with the state size.
const CHUNK_BYTES: usize = 1 << 20;

/// Name of the file holding the trainer's progress, as the Hugging Face Trainer writes it.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Where a rank's own progress and digest are, inside its `rank-<r>/` directory.
pub const PART_STATE_FILE: &str = "state.json";

/// Prefix of checkpoint directories, as the Hugging Face Trainer names them.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// The shape of a training state: everything besides the step that determines its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateShape {
    pub seed: u64,
    /// Total bytes of model shards plus optimizer state.
    pub size: u64,
    pub shards: u32,
    pub frozen_shards: u32,
}

/// `trainer_state.json`: the fields the Hugging Face Trainer writes that matter here, plus the
/// shape and digest this trainer uses to check a resumed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: u64,
    pub shape: StateShape,
    /// Digest of every state file's bytes (see [`digest_checkpoint`]).
    pub digest: String,
}

/// One rank's part of a multi-pod job's checkpoint. Its files live under `rank-<r>/` of the
/// `checkpoint-N/` directory, with bytes of their own, and its digest in `rank-<r>/state.json`;
/// `trainer_state.json` and `config.json` are the same on every rank (what a trainer writes on
/// each node), so two ranks' parts never disagree about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub rank: u32,
    pub world_size: u32,
}

impl Part {
    fn dir(&self) -> String {
        format!("rank-{}", self.rank)
    }
}

/// `trainer_state.json` of a multi-pod checkpoint: the same bytes on every rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub global_step: u64,
    pub shape: StateShape,
    pub world_size: u32,
}

/// One file of a checkpoint: its name and how its bytes are produced.
struct StateFile {
    name: String,
    len: u64,
    /// Key of the byte stream; files whose key does not depend on the step never change.
    key: u64,
}

impl StateShape {
    /// The state files at `step`, of one rank when `part` says so.
    fn files(&self, step: u64, part: Option<Part>) -> Vec<StateFile> {
        let mut files = self.single_files(step);
        if let Some(part) = part {
            for file in &mut files {
                file.name = format!("{}/{}", part.dir(), file.name);
                file.key = mix(file.key ^ mix(0xa11_0000 + u64::from(part.rank)));
            }
        }
        files
    }

    fn single_files(&self, step: u64) -> Vec<StateFile> {
        let shards = u64::from(self.shards.max(1));
        let shard_len = self.size / 2 / shards;
        let mut files = Vec::new();
        for i in 0..shards {
            let frozen = i < u64::from(self.frozen_shards);
            let file_step = if frozen { 0 } else { step };
            files.push(StateFile {
                name: format!("model-{:05}-of-{:05}.safetensors", i + 1, shards),
                len: shard_len,
                key: mix(self.seed ^ mix(i + 1) ^ mix(file_step.wrapping_add(1) << 20)),
            });
        }
        files.push(StateFile {
            name: "optimizer.pt".to_string(),
            len: self.size - shard_len * shards,
            key: mix(self.seed ^ mix(u64::MAX - 1) ^ mix(step.wrapping_add(1) << 20)),
        });
        files.push(StateFile {
            name: "rng_state.pth".to_string(),
            len: 64,
            key: mix(self.seed ^ mix(u64::MAX - 2) ^ mix(step.wrapping_add(1) << 20)),
        });
        files.push(StateFile {
            name: "scheduler.pt".to_string(),
            len: 1024,
            key: mix(self.seed ^ mix(u64::MAX - 3) ^ mix(step.wrapping_add(1) << 20)),
        });
        files
    }
}

/// splitmix64 finalizer: a fast, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the bytes at `offset` (a multiple of 8) of the stream named `key`.
fn fill(key: u64, offset: u64, buf: &mut [u8]) {
    for (word, chunk) in (offset / 8..).zip(buf.chunks_mut(8)) {
        let bytes = mix(key ^ word.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Running digest of a sequence of files: crc32c of each file's name and bytes, folded.
#[derive(Default)]
struct Digest {
    parts: Vec<(String, u32, u64)>,
}

impl Digest {
    fn finish(mut self) -> String {
        self.parts.sort();
        let mut crc = 0u32;
        for (name, file_crc, len) in &self.parts {
            crc = crc32c::crc32c_append(crc, name.as_bytes());
            crc = crc32c::crc32c_append(crc, &file_crc.to_le_bytes());
            crc = crc32c::crc32c_append(crc, &len.to_le_bytes());
        }
        format!("{crc:08x}-{}", self.parts.iter().map(|p| p.2).sum::<u64>())
    }
}

/// Directory name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{step}")
}

/// What the digest of the state at `step` must be, computed without touching the disk.
pub fn expected_digest(shape: &StateShape, step: u64) -> String {
    expected_part_digest(shape, step, None)
}

/// [`expected_digest`] of one rank's part.
pub fn expected_part_digest(shape: &StateShape, step: u64, part: Option<Part>) -> String {
    let mut digest = Digest::default();
    let mut buf = vec![0u8; CHUNK_BYTES];
    for file in shape.files(step, part) {
        let mut crc = 0u32;
        let mut offset = 0u64;
        while offset < file.len {
            let n = usize::try_from((file.len - offset).min(CHUNK_BYTES as u64)).unwrap_or(0);
            fill(file.key, offset, &mut buf[..n]);
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            offset += n as u64;
        }
        digest.parts.push((file.name, crc, file.len));
    }
    digest.finish()
}

/// What writing a checkpoint produced.
#[derive(Debug, Clone)]
pub struct WrittenCheckpoint {
    pub path: PathBuf,
    pub bytes: u64,
    pub digest: String,
}

/// Options that change how a checkpoint is written, for tests of the sidecar's waiting logic.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Pause between chunks, so a checkpoint takes a while to write (a slow disk).
    pub chunk_pause: Option<std::time::Duration>,
    /// Write the first chunk of the optimizer state, then keep the file open and never finish.
    pub hang: bool,
}

/// Writes the checkpoint of `step` into `dir/checkpoint-<step>/`, the way a trainer does: files
/// are written in place (not renamed into place), `trainer_state.json` last.
pub fn write_checkpoint(
    dir: &Path,
    shape: &StateShape,
    step: u64,
    options: WriteOptions,
) -> std::io::Result<WrittenCheckpoint> {
    write_part(dir, shape, step, options, None)
}

/// [`write_checkpoint`] of one rank's part (`part`), or of the whole state (`None`).
pub fn write_part(
    dir: &Path,
    shape: &StateShape,
    step: u64,
    options: WriteOptions,
    part: Option<Part>,
) -> std::io::Result<WrittenCheckpoint> {
    let path = dir.join(checkpoint_name(step));
    fs::create_dir_all(&path)?;
    if let Some(part) = part {
        fs::create_dir_all(path.join(part.dir()))?;
    }
    let mut digest = Digest::default();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    for file in shape.files(step, part) {
        let mut out = BufWriter::with_capacity(CHUNK_BYTES, File::create(path.join(&file.name))?);
        let mut crc = 0u32;
        let mut offset = 0u64;
        while offset < file.len {
            let n = usize::try_from((file.len - offset).min(CHUNK_BYTES as u64)).unwrap_or(0);
            fill(file.key, offset, &mut buf[..n]);
            out.write_all(&buf[..n])?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            offset += n as u64;
            if options.hang && file.name.ends_with("optimizer.pt") {
                out.flush()?;
                // Holds the file open for writing until the process is killed.
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            if let Some(pause) = options.chunk_pause {
                out.flush()?;
                std::thread::sleep(pause);
            }
        }
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        bytes += file.len;
        digest.parts.push((file.name, crc, file.len));
    }
    let digest = digest.finish();
    let config = serde_json::json!({"model_type": "nerve-test", "shards": shape.shards});
    fs::write(
        path.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let state = TrainerState {
        global_step: step,
        shape: *shape,
        digest: digest.clone(),
    };
    let top = match part {
        Some(part) => {
            fs::write(
                path.join(part.dir()).join(PART_STATE_FILE),
                serde_json::to_vec_pretty(&state)?,
            )?;
            serde_json::to_vec_pretty(&JobState {
                global_step: step,
                shape: *shape,
                world_size: part.world_size,
            })?
        }
        None => serde_json::to_vec_pretty(&state)?,
    };
    fs::write(path.join(TRAINER_STATE_FILE), top)?;
    Ok(WrittenCheckpoint {
        path,
        bytes,
        digest,
    })
}

/// The checkpoint directories under `dir` that hold a `trainer_state.json`, oldest first.
pub fn list_checkpoints(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CHECKPOINT_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(TRAINER_STATE_FILE).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Why a checkpoint could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "state in {path} does not match step {step}: digest {found}, expected {expected} (the checkpoint is torn or corrupt)"
    )]
    Mismatch {
        path: PathBuf,
        step: u64,
        found: String,
        expected: String,
    },
}

/// Loads the checkpoint in `path`: reads every state file, checks its digest against the one a
/// trainer at that step holds, and returns the state.
pub fn load_checkpoint(path: &Path) -> Result<TrainerState, LoadError> {
    load_part(path, None)
}

/// [`load_checkpoint`] of one rank's part (`part`), or of the whole state (`None`).
pub fn load_part(path: &Path, part: Option<Part>) -> Result<TrainerState, LoadError> {
    let state_path = match part {
        Some(part) => path.join(part.dir()).join(PART_STATE_FILE),
        None => path.join(TRAINER_STATE_FILE),
    };
    let raw = fs::read(&state_path).map_err(|source| LoadError::Io {
        path: state_path.clone(),
        source,
    })?;
    let state: TrainerState = serde_json::from_slice(&raw).map_err(|source| LoadError::Parse {
        path: state_path,
        source,
    })?;
    let mut digest = Digest::default();
    let mut buf = vec![0u8; CHUNK_BYTES];
    for file in state.shape.files(state.global_step, part) {
        let file_path = path.join(&file.name);
        let io = |source| LoadError::Io {
            path: file_path.clone(),
            source,
        };
        let mut input = File::open(&file_path).map_err(io)?;
        let mut crc = 0u32;
        let mut len = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            len += n as u64;
        }
        digest.parts.push((file.name, crc, len));
    }
    let found = digest.finish();
    let expected = expected_part_digest(&state.shape, state.global_step, part);
    if found != expected || found != state.digest {
        return Err(LoadError::Mismatch {
            path: path.to_path_buf(),
            step: state.global_step,
            found,
            expected,
        });
    }
    Ok(state)
}

/// A byte size as the trainer and the demo take it: `4096`, `64MiB`, `2GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size; use e.g. 4096, 64MiB or 2GiB"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit `{other}`; use B, KiB, MiB or GiB")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> StateShape {
        StateShape {
            seed: 7,
            size: 3 << 20,
            shards: 4,
            frozen_shards: 2,
        }
    }

    #[test]
    fn a_written_checkpoint_loads_with_the_digest_it_was_written_with() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_checkpoint(dir.path(), &shape(), 12, WriteOptions::default()).unwrap();
        assert_eq!(written.digest, expected_digest(&shape(), 12));
        let state = load_checkpoint(&written.path).unwrap();
        assert_eq!(state.global_step, 12);
        assert_eq!(state.digest, written.digest);
        assert_eq!(
            list_checkpoints(dir.path()).unwrap(),
            vec![(12, written.path)]
        );
    }

    #[test]
    fn a_flipped_byte_makes_loading_fail() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_checkpoint(dir.path(), &shape(), 3, WriteOptions::default()).unwrap();
        let file = written.path.join("optimizer.pt");
        let mut bytes = fs::read(&file).unwrap();
        bytes[100] ^= 1;
        fs::write(&file, bytes).unwrap();
        assert!(matches!(
            load_checkpoint(&written.path),
            Err(LoadError::Mismatch { .. })
        ));
    }

    #[test]
    fn frozen_shards_keep_their_bytes_across_steps_and_the_rest_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_checkpoint(dir.path(), &shape(), 1, WriteOptions::default()).unwrap();
        let b = write_checkpoint(dir.path(), &shape(), 2, WriteOptions::default()).unwrap();
        let same = |name: &str| {
            fs::read(a.path.join(name)).unwrap() == fs::read(b.path.join(name)).unwrap()
        };
        assert!(same("model-00001-of-00004.safetensors"));
        assert!(same("model-00002-of-00004.safetensors"));
        assert!(!same("model-00003-of-00004.safetensors"));
        assert!(!same("optimizer.pt"));
        assert_ne!(a.digest, b.digest);
    }

    #[test]
    fn ranks_write_parts_with_their_own_bytes_and_identical_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        let parts: Vec<Part> = (0..2)
            .map(|rank| Part {
                rank,
                world_size: 2,
            })
            .collect();
        for part in &parts {
            write_part(
                dir.path(),
                &shape(),
                9,
                WriteOptions::default(),
                Some(*part),
            )
            .unwrap();
        }
        let checkpoint = dir.path().join("checkpoint-9");
        for part in &parts {
            let state = load_part(&checkpoint, Some(*part)).unwrap();
            assert_eq!(state.global_step, 9);
        }
        let a = fs::read(checkpoint.join("rank-0/optimizer.pt")).unwrap();
        let b = fs::read(checkpoint.join("rank-1/optimizer.pt")).unwrap();
        assert_ne!(a, b, "each rank holds its own shard");
        let job: JobState =
            serde_json::from_slice(&fs::read(checkpoint.join(TRAINER_STATE_FILE)).unwrap())
                .unwrap();
        assert_eq!(job.world_size, 2);
    }
}
