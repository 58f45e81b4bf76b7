//! Where a restore writes before it is verified, and how it moves into place.
//!
//! Normally the staging directory sits beside `--dir` (`.<name>.nerve-restore-<generation>`)
//! and the swap is two renames: the old directory away, the staging directory in. When
//! `--dir` is a mount point (a Kubernetes volume, which cannot be renamed and whose parent is
//! another filesystem) the staging directory lives inside it (`.nerve-restore-<generation>`,
//! a name uploads skip) and the swap moves each top-level entry with renames.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::generation::Generation;
use crate::upload::RESERVED_PREFIX;

#[derive(Debug)]
pub struct Staging {
    /// The checkpoint directory to fill.
    pub dir: PathBuf,
    /// Where files are written before the swap.
    pub path: PathBuf,
    /// Where the previous contents go during the swap.
    old: PathBuf,
    inside: bool,
}

impl Staging {
    /// Bytes an unprivileged writer may still use on the staging filesystem; `None` when the
    /// filesystem does not say.
    pub fn available_bytes(&self) -> Option<u64> {
        let stat = nix::sys::statvfs::statvfs(&self.path).ok()?;
        if stat.blocks() == 0 {
            return None; // Some FUSE and virtual filesystems report no sizes at all.
        }
        stat.blocks_available().checked_mul(stat.fragment_size())
    }

    /// Picks and creates a fresh staging directory for restoring `generation` into `dir`,
    /// removing leftovers of an earlier interrupted restore.
    pub fn create(dir: &Path, generation: &Generation) -> io::Result<Staging> {
        let dir = absolute(dir)?;
        let inside = is_mount_point(&dir)?;
        let staging = if inside {
            Staging {
                path: dir.join(format!("{RESERVED_PREFIX}restore-{generation}")),
                old: dir.join(format!("{RESERVED_PREFIX}old-{generation}")),
                dir,
                inside,
            }
        } else {
            let parent = dir
                .parent()
                .ok_or_else(|| io::Error::other("the checkpoint directory cannot be /"))?
                .to_path_buf();
            std::fs::create_dir_all(&parent)?;
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| io::Error::other("the checkpoint directory needs a UTF-8 name"))?
                .to_owned();
            Staging {
                path: parent.join(format!(".{name}{RESERVED_PREFIX}restore-{generation}")),
                old: parent.join(format!(".{name}{RESERVED_PREFIX}old-{generation}")),
                dir,
                inside,
            }
        };
        staging.remove_leftovers()?;
        std::fs::create_dir(&staging.path)?;
        Ok(staging)
    }

    /// Full path of a manifest path (already validated as relative and normal) in staging.
    pub fn file_path(&self, relative: &str) -> PathBuf {
        self.path.join(relative)
    }

    /// Removes the staging directory (after a failure). `--dir` is not touched.
    pub fn discard(&self) {
        if let Err(err) = remove_if_exists(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove the staging directory: {err}");
        }
    }

    /// Puts the staged files in place of the directory's contents.
    pub fn swap_into_place(&self) -> io::Result<()> {
        if self.inside {
            self.swap_entries()
        } else {
            self.swap_directory()
        }
    }

    fn swap_directory(&self) -> io::Result<()> {
        let had_old = match std::fs::rename(&self.dir, &self.old) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if let Err(err) = std::fs::rename(&self.path, &self.dir) {
            if had_old {
                let _ = std::fs::rename(&self.old, &self.dir);
            }
            return Err(err);
        }
        if had_old && let Err(err) = std::fs::remove_dir_all(&self.old) {
            tracing::warn!(path = %self.old.display(), "cannot remove the previous checkpoint directory: {err}");
        }
        Ok(())
    }

    fn swap_entries(&self) -> io::Result<()> {
        std::fs::create_dir(&self.old)?;
        let mut moved_away = Vec::new();
        let result = (|| {
            for entry in std::fs::read_dir(&self.dir)? {
                let entry = entry?;
                let name = entry.file_name();
                if name
                    .to_str()
                    .is_some_and(|n| n.starts_with(RESERVED_PREFIX))
                {
                    continue;
                }
                std::fs::rename(entry.path(), self.old.join(&name))?;
                moved_away.push(name);
            }
            for entry in std::fs::read_dir(&self.path)? {
                let entry = entry?;
                std::fs::rename(entry.path(), self.dir.join(entry.file_name()))?;
            }
            io::Result::Ok(())
        })();
        if let Err(err) = result {
            // Put back what was moved away; staged entries already moved stay (best effort).
            for name in moved_away {
                let _ = std::fs::rename(self.old.join(&name), self.dir.join(&name));
            }
            return Err(err);
        }
        remove_if_exists(&self.path)?;
        if let Err(err) = std::fs::remove_dir_all(&self.old) {
            tracing::warn!(path = %self.old.display(), "cannot remove the previous checkpoint: {err}");
        }
        Ok(())
    }

    fn remove_leftovers(&self) -> io::Result<()> {
        let (scan_dir, prefix) = if self.inside {
            (self.dir.clone(), RESERVED_PREFIX.to_owned())
        } else {
            let parent = self
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let name = self
                .dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            (parent, format!(".{name}{RESERVED_PREFIX}"))
        };
        let Ok(entries) = std::fs::read_dir(&scan_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let stale = entry.file_name().to_str().is_some_and(|n| {
                n.starts_with(&format!("{prefix}restore-"))
                    || n.starts_with(&format!("{prefix}old-"))
            });
            if stale {
                tracing::info!(path = %entry.path().display(), "removing leftovers of an interrupted restore");
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn absolute(dir: &Path) -> io::Result<PathBuf> {
    if dir.is_absolute() {
        Ok(dir.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(dir))
    }
}

/// A directory on another filesystem than its parent cannot be renamed over.
fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(parent) = dir.parent() else {
        return Ok(true);
    };
    let parent_meta = std::fs::metadata(parent)?;
    Ok(meta.dev() != parent_meta.dev() || meta.ino() == parent_meta.ino())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> Generation {
        Generation::parse("20261124T021116123Z-00000001").expect("valid")
    }

    #[test]
    fn swaps_a_staged_directory_into_place_and_removes_the_old_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("old.bin"), b"old").expect("write");
        let staging = Staging::create(&dir, &generation()).expect("staging");
        assert!(staging.path.starts_with(root.path()));
        std::fs::write(staging.file_path("new.bin"), b"new").expect("write");
        staging.swap_into_place().expect("swap");
        assert!(!dir.join("old.bin").exists());
        assert_eq!(std::fs::read(dir.join("new.bin")).expect("read"), b"new");
        let leftovers: Vec<_> = std::fs::read_dir(root.path()).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "only the checkpoint directory remains");
    }

    #[test]
    fn discarding_leaves_the_directory_as_it_was() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("old.bin"), b"old").expect("write");
        let staging = Staging::create(&dir, &generation()).expect("staging");
        std::fs::write(staging.file_path("new.bin"), b"new").expect("write");
        staging.discard();
        assert!(!staging.path.exists());
        assert_eq!(std::fs::read(dir.join("old.bin")).expect("read"), b"old");
    }

    #[test]
    fn entry_swap_replaces_contents_in_place() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("old.bin"), b"old").expect("write");
        // Force the mount-point strategy, which cannot be set up without privileges.
        let generation = generation();
        let staging = Staging {
            path: dir.join(format!("{RESERVED_PREFIX}restore-{generation}")),
            old: dir.join(format!("{RESERVED_PREFIX}old-{generation}")),
            dir: dir.clone(),
            inside: true,
        };
        std::fs::create_dir(&staging.path).expect("mkdir");
        std::fs::create_dir(staging.file_path("sub")).expect("mkdir");
        std::fs::write(staging.file_path("sub/new.bin"), b"new").expect("write");
        staging.swap_into_place().expect("swap");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        assert_eq!(names, ["sub"]);
        assert_eq!(
            std::fs::read(dir.join("sub/new.bin")).expect("read"),
            b"new"
        );
    }
}
