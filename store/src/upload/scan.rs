//! Walking the checkpoint directory: every regular file and every link that stays inside it,
//! with what is needed to upload it and to notice it changed meanwhile.
//!
//! The walk never follows a symbolic link. Each directory is opened with `O_NOFOLLOW` and
//! checked to be the one its parent listed (device and inode), and entries are examined relative
//! to that open directory, so a link planted in the tree (or a directory swapped for one
//! mid-walk) cannot lead the walk, and the upload after it, outside `--dir`. A link whose target
//! stays inside `--dir` is recorded as a link (restore recreates it); one pointing outside is
//! skipped with a warning. Sockets, FIFOs and devices are skipped. Excluded paths are never
//! entered.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};

use super::UploadError;
use crate::exclude::Excludes;
use crate::manifest::resolve_link;

/// A file (or link) of the checkpoint as found on disk.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub abs_path: PathBuf,
    pub stamp: FileStamp,
    /// For a symbolic link: its target, relative to the link's own directory.
    pub link: Option<String>,
}

/// What changes when a file is written or replaced: size, type and mode, modification time,
/// and which file it is (device and inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    /// File type and permission bits, as `st_mode`.
    pub mode: u32,
    pub modified: Option<SystemTime>,
    pub inode: u64,
    pub device: u64,
}

impl FileStamp {
    /// The stamp of `path` itself (a link is not followed).
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(FileStamp {
            size: meta.len(),
            mode: meta.mode(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
            device: meta.dev(),
        })
    }

    fn from_stat(stat: &FileStat) -> FileStamp {
        let modified = u64::try_from(stat.st_mtime).ok().map(|seconds| {
            SystemTime::UNIX_EPOCH
                + std::time::Duration::new(seconds, u32::try_from(stat.st_mtime_nsec).unwrap_or(0))
        });
        FileStamp {
            size: u64::try_from(stat.st_size).unwrap_or(0),
            mode: stat.st_mode,
            modified,
            inode: stat.st_ino,
            device: stat.st_dev,
        }
    }

    /// The permission bits a manifest records: read, write and execute only. Setuid, setgid
    /// and sticky bits are never carried into the store (nor restored from it).
    pub fn permissions(&self) -> u32 {
        self.mode & 0o777
    }

    /// The same file (device and inode), whatever happened to its contents.
    pub fn same_file(&self, other: &FileStamp) -> bool {
        self.device == other.device && self.inode == other.inode
    }
}

/// Every regular file and inside-pointing link under `dir` that `excludes` does not exclude,
/// sorted by path.
pub fn scan_directory(dir: &Path, excludes: &Excludes) -> Result<Vec<LocalFile>, UploadError> {
    let meta = std::fs::metadata(dir).map_err(|source| UploadError::ReadDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(UploadError::NotADirectory(dir.to_path_buf()));
    }
    // `--dir` itself may be reached through a link (that is configuration); nothing below it.
    let root = std::fs::canonicalize(dir).map_err(|source| UploadError::ReadDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    let mut pending = vec![(root.clone(), String::new(), (meta.dev(), meta.ino()))];
    while let Some((abs_dir, rel_dir, identity)) = pending.pop() {
        let read_error = |source: std::io::Error| UploadError::ReadDir {
            path: abs_dir.clone(),
            source,
        };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut handle = match Dir::open(&abs_dir, flags, Mode::empty()) {
            Ok(handle) => handle,
            // Removed since its parent was listed (a trainer rotating checkpoints).
            Err(nix::Error::ENOENT) => continue,
            Err(e) => return Err(read_error(e.into())),
        };
        let opened = fstat(&handle).map_err(|e| read_error(e.into()))?;
        if (opened.st_dev, opened.st_ino) != identity {
            tracing::warn!(path = %abs_dir.display(), "skipping a directory that was replaced while the checkpoint was being read");
            continue;
        }
        let names: Vec<std::ffi::CString> = handle
            .iter()
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_owned())
            .filter(|name| !matches!(name.as_bytes(), b"." | b".."))
            .collect();
        for name in names {
            let Ok(name_str) = name.to_str().map(str::to_owned) else {
                return Err(UploadError::NonUtf8Path(
                    abs_dir.join(std::ffi::OsStr::from_bytes(name.as_bytes())),
                ));
            };
            let rel_path = if rel_dir.is_empty() {
                name_str.clone()
            } else {
                format!("{rel_dir}/{name_str}")
            };
            let abs_path = abs_dir.join(&name_str);
            let stat = match fstatat(&handle, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                // Deleted between listing and stat: not part of the checkpoint.
                Err(nix::Error::ENOENT) => continue,
                Err(e) => {
                    return Err(UploadError::ReadFile {
                        path: abs_path,
                        source: e.into(),
                    });
                }
            };
            let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
            if kind == SFlag::S_IFDIR {
                if !excludes.excludes_dir(&rel_path) {
                    pending.push((abs_path, rel_path, (stat.st_dev, stat.st_ino)));
                }
            } else if excludes.excludes_file(&rel_path) {
                continue;
            } else if kind == SFlag::S_IFREG {
                files.push(LocalFile {
                    path: rel_path,
                    abs_path,
                    stamp: FileStamp::from_stat(&stat),
                    link: None,
                });
            } else if kind == SFlag::S_IFLNK {
                let target = match nix::fcntl::readlinkat(&handle, name.as_c_str()) {
                    Ok(target) => target,
                    Err(nix::Error::ENOENT) => continue,
                    Err(e) => {
                        return Err(UploadError::ReadFile {
                            path: abs_path,
                            source: e.into(),
                        });
                    }
                };
                match inside_link_target(&root, &rel_dir, Path::new(&target)) {
                    Some(relative) => files.push(LocalFile {
                        path: rel_path,
                        abs_path,
                        stamp: FileStamp::from_stat(&stat),
                        link: Some(relative),
                    }),
                    None => tracing::warn!(
                        path = %abs_path.display(),
                        target = %Path::new(&target).display(),
                        "skipping a symbolic link that points outside the checkpoint directory \
                         (its target is never read or uploaded)"
                    ),
                }
            } else {
                tracing::warn!(path = %abs_path.display(), "skipping a special file (socket, fifo or device)");
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The target of a link in `rel_dir` (relative to the checkpoint root `root`), relative to the
/// link's directory, when it stays inside the root; `None` when it leaves it.
///
/// Judged on the path alone ([`resolve_link`]), never by following links: a target that passes
/// through another link is itself inside the directory, and that link is judged on its own.
pub fn inside_link_target(root: &Path, rel_dir: &str, target: &Path) -> Option<String> {
    let text = target.to_str()?;
    if !target.is_absolute() {
        return resolve_link(rel_dir, text).map(|_| text.to_owned());
    }
    let resolved = resolve_link("", target.strip_prefix(root).ok()?.to_str()?)?;
    // Up out of the link's directory to the common ancestor, then down to the target.
    let link_dir: Vec<&str> = rel_dir.split('/').filter(|s| !s.is_empty()).collect();
    let target_parts: Vec<&str> = resolved.split('/').filter(|s| !s.is_empty()).collect();
    let common = link_dir
        .iter()
        .zip(&target_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut parts = vec![".."; link_dir.len() - common];
    parts.extend(&target_parts[common..]);
    Some(if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_files_and_skips_restore_leftovers_and_excluded_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/c.bin"), b"x").expect("write");
        std::fs::write(dir.path().join("top"), b"").expect("write");
        std::fs::create_dir_all(dir.path().join(".nerve-old-x")).expect("mkdir");
        std::fs::write(dir.path().join(".nerve-old-x/stale"), b"x").expect("write");
        std::fs::create_dir_all(dir.path().join("runs/today")).expect("mkdir");
        std::fs::write(dir.path().join("runs/today/events.out.tfevents.1"), b"x").expect("write");
        std::fs::write(dir.path().join("train.log"), b"x").expect("write");
        let files = scan_directory(dir.path(), &Excludes::default()).expect("scan");
        let paths: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a/b/c.bin", "top"]);
        assert_eq!(files[1].stamp.size, 0);
        let everything = scan_directory(dir.path(), &Excludes::nothing()).expect("scan");
        assert_eq!(everything.len(), 4, "only the reserved names stay out");
    }

    #[test]
    fn records_links_that_stay_inside_and_skips_the_rest_without_reading_them() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"secret").expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("checkpoint-2")).expect("mkdir");
        std::fs::write(dir.path().join("checkpoint-2/model.bin"), b"m").expect("write");
        let link = |target: &Path, at: &str| {
            std::os::unix::fs::symlink(target, dir.path().join(at)).expect("symlink")
        };
        link(Path::new("checkpoint-2"), "last");
        link(
            &dir.path().join("checkpoint-2/model.bin"),
            "checkpoint-2/alias.bin",
        );
        link(&outside.path().join("secret"), "x");
        link(Path::new("../../etc/passwd"), "checkpoint-2/up");
        link(outside.path(), "outside-dir");
        let files = scan_directory(dir.path(), &Excludes::nothing()).expect("scan");
        let found: Vec<_> = files
            .iter()
            .map(|f| (f.path.as_str(), f.link.as_deref()))
            .collect();
        assert_eq!(
            found,
            [
                ("checkpoint-2/alias.bin", Some("model.bin")),
                ("checkpoint-2/model.bin", None),
                ("last", Some("checkpoint-2")),
            ]
        );
    }

    #[test]
    fn link_targets_are_judged_and_rewritten_on_the_path_alone() {
        let root = Path::new("/ckpt");
        let inside =
            |rel_dir: &str, target: &str| inside_link_target(root, rel_dir, Path::new(target));
        assert_eq!(inside("", "a/b").as_deref(), Some("a/b"));
        assert_eq!(inside("a", "../b").as_deref(), Some("../b"));
        assert_eq!(inside("a/b", "/ckpt/a/c").as_deref(), Some("../c"));
        assert_eq!(inside("a", "/ckpt/a").as_deref(), Some("."));
        assert_eq!(inside("a", "../../x"), None);
        assert_eq!(inside("", "/etc/passwd"), None);
        assert_eq!(inside("", "/ckptx/a"), None);
    }
}
