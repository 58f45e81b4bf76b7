//! Walking the checkpoint directory: every regular file, with what is needed to upload it and
//! to notice it changed meanwhile.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::UploadError;

/// Top-level names restore uses for its staging and swap directories inside a mounted
/// checkpoint directory; never part of a checkpoint.
pub const RESERVED_PREFIX: &str = ".nerve-";

/// A file of the checkpoint as found on disk.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub abs_path: PathBuf,
    pub stamp: FileStamp,
}

/// What changes when a file is written: size, modification time, inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub mode: u32,
    pub modified: Option<SystemTime>,
    pub inode: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }
}

/// Every regular file under `dir` (following symlinks to files), sorted by path.
pub fn scan_directory(dir: &Path) -> Result<Vec<LocalFile>, UploadError> {
    let meta = std::fs::metadata(dir).map_err(|source| UploadError::ReadDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(UploadError::NotADirectory(dir.to_path_buf()));
    }
    let mut files = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs_dir, rel_dir)) = pending.pop() {
        let entries = std::fs::read_dir(&abs_dir).map_err(|source| UploadError::ReadDir {
            path: abs_dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| UploadError::ReadDir {
                path: abs_dir.clone(),
                source,
            })?;
            let abs_path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(UploadError::NonUtf8Path(abs_path));
            };
            if rel_dir.is_empty() && name.starts_with(RESERVED_PREFIX) {
                continue;
            }
            let rel_path = if rel_dir.is_empty() {
                name
            } else {
                format!("{rel_dir}/{name}")
            };
            let file_type = entry.file_type().map_err(|source| UploadError::ReadFile {
                path: abs_path.clone(),
                source,
            })?;
            if file_type.is_dir() {
                pending.push((abs_path, rel_path));
            } else if file_type.is_file() || file_type.is_symlink() {
                let stamp = match FileStamp::of(&abs_path) {
                    Ok(stamp) => stamp,
                    // Deleted between listing and stat (a trainer rotating checkpoints), or a
                    // dangling symlink: not part of the checkpoint.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(UploadError::ReadFile {
                            path: abs_path,
                            source,
                        });
                    }
                };
                let is_file = std::fs::metadata(&abs_path).is_ok_and(|m| m.is_file());
                if !is_file {
                    tracing::warn!(path = %abs_path.display(), "skipping a symlink that does not point to a regular file");
                    continue;
                }
                files.push(LocalFile {
                    path: rel_path,
                    abs_path,
                    stamp,
                });
            } else {
                tracing::warn!(path = %abs_path.display(), "skipping a special file (socket, fifo or device)");
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_files_and_skips_restore_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/c.bin"), b"x").expect("write");
        std::fs::write(dir.path().join("top"), b"").expect("write");
        std::fs::create_dir_all(dir.path().join(".nerve-old-x")).expect("mkdir");
        std::fs::write(dir.path().join(".nerve-old-x/stale"), b"x").expect("write");
        let files = scan_directory(dir.path()).expect("scan");
        let paths: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a/b/c.bin", "top"]);
        assert_eq!(files[1].stamp.size, 0);
    }
}
