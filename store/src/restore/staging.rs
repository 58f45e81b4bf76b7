//! Where a restore writes before it is verified, and how it moves into place so that a crash
//! at any point leaves either the old or the new content whole.
//!
//! Normally the staging directory sits beside `--dir` (`.<name>.nerve-restore-<generation>`)
//! and the swap is one atomic `renameat2(RENAME_EXCHANGE)`: the verified generation and the old
//! directory trade places, then the old one (now under the staging name) is removed. When
//! `--dir` is a mount point, which cannot be renamed (a Kubernetes volume, a systemd
//! `ReadWritePaths=`/`StateDirectory=` bind mount, a nested volume; found in
//! `/proc/self/mountinfo`, not by device number, which a bind mount shares with its parent), or
//! when its parent is not writable, the staging directory lives inside it
//! (`.nerve-restore-<generation>`, a name uploads skip) and the swap moves each top-level entry,
//! recording its progress in a journal (`.nerve-swap.json`) first. A restore that finds a
//! journal finishes the swap it describes (if every old entry was moved out) or undoes it.
//!
//! Files excluded from checkpoints (logs, [`crate::exclude`]) are carried over into the new
//! content, so a restore over a volume that survived the pod keeps its TensorBoard history.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use crate::exclude::{Excludes, RESERVED_PREFIX};
use crate::generation::Generation;

/// The journal of an entry-by-entry swap inside a mount point.
const JOURNAL: &str = ".nerve-swap.json";

#[derive(Debug)]
pub struct Staging {
    /// The checkpoint directory to fill.
    pub dir: PathBuf,
    /// Where files are written before the swap.
    pub path: PathBuf,
    /// Where the previous contents go during an entry-by-entry swap.
    old: PathBuf,
    inside: bool,
}

/// Progress of an entry-by-entry swap, written before each phase.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Journal {
    /// `out`: moving the old entries aside; `in`: moving the staged entries in.
    phase: String,
    old: String,
    staging: String,
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
    /// after finishing or undoing a swap an earlier restore was interrupted in, and removing
    /// its leftovers.
    pub fn create(dir: &Path, generation: &Generation) -> io::Result<Staging> {
        let dir = absolute(dir)?;
        recover_interrupted_swap(&dir)?;
        let beside = (!is_mount_point(&dir)?)
            .then(|| Staging::beside(&dir, generation))
            .transpose()?;
        if let Some(staging) = beside {
            staging.remove_leftovers()?;
            match std::fs::create_dir(&staging.path) {
                Ok(()) => return Ok(staging),
                // A read-only or foreign parent (systemd's ProtectSystem=strict around a
                // ReadWritePaths= directory): stage inside instead.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EROFS | nix::libc::EACCES | nix::libc::EPERM)
                    ) =>
                {
                    tracing::info!(parent = %staging.path.display(), "cannot stage beside the checkpoint directory ({e}); staging inside it");
                }
                Err(e) => return Err(e),
            }
        }
        std::fs::create_dir_all(&dir)?;
        let staging = Staging {
            path: dir.join(format!("{RESERVED_PREFIX}restore-{generation}")),
            old: dir.join(format!("{RESERVED_PREFIX}old-{generation}")),
            dir,
            inside: true,
        };
        staging.remove_leftovers()?;
        std::fs::create_dir(&staging.path)?;
        Ok(staging)
    }

    fn beside(dir: &Path, generation: &Generation) -> io::Result<Staging> {
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
        Ok(Staging {
            path: parent.join(format!(".{name}{RESERVED_PREFIX}restore-{generation}")),
            old: parent.join(format!(".{name}{RESERVED_PREFIX}old-{generation}")),
            dir: dir.to_path_buf(),
            inside: false,
        })
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

    /// Links (or, across mounts, copies) the files of `--dir` that `excludes` excludes into
    /// staging, where staging has nothing at that path: logs survive the swap.
    pub fn carry_excluded(&self, excludes: &Excludes) -> io::Result<usize> {
        let mut carried = 0;
        let mut pending = vec![(self.dir.clone(), String::new())];
        while let Some((abs_dir, rel_dir)) = pending.pop() {
            let entries = match std::fs::read_dir(&abs_dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let rel = if rel_dir.is_empty() {
                    name
                } else {
                    format!("{rel_dir}/{name}")
                };
                if crate::exclude::is_reserved(&rel) {
                    continue;
                }
                let file_type = entry.file_type()?;
                let excluded = if file_type.is_dir() {
                    excludes.excludes_dir(&rel)
                } else {
                    excludes.excludes_file(&rel)
                };
                let target = self.path.join(&rel);
                if file_type.is_dir() && !excluded {
                    pending.push((entry.path(), rel));
                } else if excluded && std::fs::symlink_metadata(&target).is_err() {
                    carry(&entry.path(), &target, file_type.is_dir())?;
                    carried += 1;
                }
            }
        }
        Ok(carried)
    }

    /// Puts the staged files in place of the directory's contents. On failure the staging
    /// directory is removed when the old contents are still (or again) whole in `--dir`, and
    /// kept when the swap had passed its commit point, for the next restore to finish.
    pub fn swap_into_place(&self) -> io::Result<()> {
        if self.inside {
            self.swap_entries()
        } else {
            let result = self.swap_directory();
            if result.is_err() {
                self.discard();
            }
            result
        }
    }

    fn swap_directory(&self) -> io::Result<()> {
        // The new directory takes the old one's owner and permissions (a volume's fsGroup).
        if let Ok(meta) = std::fs::metadata(&self.dir) {
            let _ = std::fs::set_permissions(&self.path, meta.permissions());
            let _ = std::os::unix::fs::lchown(&self.path, Some(meta.uid()), Some(meta.gid()));
        }
        match renameat2(
            AT_FDCWD,
            &self.path,
            AT_FDCWD,
            &self.dir,
            RenameFlags::RENAME_EXCHANGE,
        ) {
            // The old contents are now at the staging path.
            Ok(()) => {
                remove_or_warn(&self.path);
                return Ok(());
            }
            Err(nix::Error::ENOENT) if !self.dir.exists() => {
                return std::fs::rename(&self.path, &self.dir);
            }
            // A filesystem without RENAME_EXCHANGE: two renames, undone by the next restore if
            // interrupted between them (see `recover_interrupted_swap`).
            Err(nix::Error::EINVAL | nix::Error::ENOSYS) => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::rename(&self.dir, &self.old)?;
        if let Err(err) = std::fs::rename(&self.path, &self.dir) {
            std::fs::rename(&self.old, &self.dir)?;
            return Err(err);
        }
        remove_or_warn(&self.old);
        Ok(())
    }

    fn swap_entries(&self) -> io::Result<()> {
        let journal = |phase: &str| {
            write_journal(
                &self.dir,
                &Journal {
                    phase: phase.to_owned(),
                    old: file_name(&self.old),
                    staging: file_name(&self.path),
                },
            )
        };
        // Until the journal says `in`, a failure puts the old entries back and drops staging.
        let moved_out = std::fs::create_dir(&self.old)
            .and_then(|()| journal("out"))
            .and_then(|()| move_entries(&self.dir, &self.old))
            .and_then(|()| journal("in"));
        if let Err(err) = moved_out {
            move_entries(&self.old, &self.dir)?;
            remove_if_exists(&self.dir.join(JOURNAL))?;
            remove_or_warn(&self.old);
            self.discard();
            return Err(err);
        }
        // Committed: a failure from here on is finished by the next restore, so staging stays.
        move_entries(&self.path, &self.dir)?;
        remove_if_exists(&self.dir.join(JOURNAL))?;
        remove_if_exists(&self.path)?;
        remove_or_warn(&self.old);
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
            (
                parent,
                format!(".{}{RESERVED_PREFIX}", file_name(&self.dir)),
            )
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

/// Finishes or undoes a swap an earlier restore of `dir` was interrupted in.
///
/// Inside a mount point the journal says how far it got. Beside it, the only window is between
/// the two renames of a filesystem without `RENAME_EXCHANGE`: `--dir` missing while the old
/// contents wait under the `old-` name; they are put back.
fn recover_interrupted_swap(dir: &Path) -> io::Result<()> {
    let journal_path = dir.join(JOURNAL);
    if let Ok(raw) = std::fs::read(&journal_path) {
        let journal: Journal = serde_json::from_slice(&raw).map_err(io::Error::other)?;
        let (old, staging) = (dir.join(&journal.old), dir.join(&journal.staging));
        for name in [&journal.old, &journal.staging] {
            if !name.starts_with(RESERVED_PREFIX) || name.contains('/') {
                return Err(io::Error::other(format!(
                    "{} names `{name}`, not a restore directory; remove it by hand",
                    journal_path.display()
                )));
            }
        }
        if journal.phase == "in" {
            tracing::warn!(dir = %dir.display(), "finishing a restore that was interrupted while moving the new checkpoint in");
            move_entries(&staging, dir)?;
        } else {
            tracing::warn!(dir = %dir.display(), "undoing a restore that was interrupted while moving the old checkpoint aside");
            move_entries(&old, dir)?;
        }
        remove_if_exists(&journal_path)?;
        remove_if_exists(&staging)?;
        remove_if_exists(&old)?;
        return Ok(());
    }
    if dir.exists() {
        return Ok(());
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
    else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    let prefix = format!(".{name}{RESERVED_PREFIX}old-");
    if let Some(old) = entries.flatten().find(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
    }) {
        tracing::warn!(dir = %dir.display(), "putting back the checkpoint an interrupted restore had moved aside");
        std::fs::rename(old.path(), dir)?;
    }
    Ok(())
}

/// Moves every top-level entry of `from` that is not Nerve's own into `to`, skipping names `to`
/// already has (moved by an earlier, interrupted attempt).
fn move_entries(from: &Path, to: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with(RESERVED_PREFIX))
        {
            continue;
        }
        if std::fs::symlink_metadata(to.join(&name)).is_ok() {
            continue;
        }
        std::fs::rename(entry.path(), to.join(&name))?;
    }
    Ok(())
}

fn write_journal(dir: &Path, journal: &Journal) -> io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{JOURNAL}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(journal).map_err(io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(JOURNAL))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Hard-links `from` to `to` (a directory: recreated, its files linked), copying where a link
/// cannot cross mounts.
fn carry(from: &Path, to: &Path, is_dir: bool) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if is_dir {
        std::fs::create_dir(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            carry(
                &entry.path(),
                &to.join(entry.file_name()),
                entry.file_type()?.is_dir(),
            )?;
        }
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        return std::os::unix::fs::symlink(std::fs::read_link(from)?, to);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => std::fs::copy(from, to).map(|_| ()),
        Err(e) => Err(e),
    }
}

fn absolute(dir: &Path) -> io::Result<PathBuf> {
    if dir.is_absolute() {
        Ok(dir.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(dir))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned()
}

/// Whether `dir` is a mount point: listed as one in `/proc/self/mountinfo` (bind mounts
/// included), or, where that cannot be read, on another device than its parent.
fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(parent) = dir.parent() else {
        return Ok(true);
    };
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        let canonical = std::fs::canonicalize(dir)?;
        return Ok(mount_points(&mountinfo).any(|point| point == canonical));
    }
    let parent_meta = std::fs::metadata(parent)?;
    Ok(meta.dev() != parent_meta.dev() || meta.ino() == parent_meta.ino())
}

/// The mount points listed in the text of `/proc/self/mountinfo` (field 5, with the kernel's
/// octal escapes for space, tab, newline and backslash undone).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo.lines().filter_map(|line| {
        let escaped = line.split(' ').nth(4)?;
        let mut bytes = Vec::with_capacity(escaped.len());
        let raw = escaped.as_bytes();
        let mut at = 0;
        while at < raw.len() {
            let octal = raw
                .get(at + 1..at + 4)
                .and_then(|digits| std::str::from_utf8(digits).ok())
                .and_then(|digits| u8::from_str_radix(digits, 8).ok());
            match (raw[at], octal) {
                (b'\\', Some(byte)) => {
                    bytes.push(byte);
                    at += 4;
                }
                (byte, _) => {
                    bytes.push(byte);
                    at += 1;
                }
            }
        }
        let name: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(bytes);
        Some(PathBuf::from(name))
    })
}

fn remove_or_warn(path: &Path) {
    if let Err(err) = remove_if_exists(path) {
        tracing::warn!(path = %path.display(), "cannot remove the previous checkpoint: {err}");
    }
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

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        names
    }

    fn inside(dir: &Path) -> Staging {
        // The mount-point strategy, which cannot be set up here without privileges.
        let generation = generation();
        let staging = Staging {
            path: dir.join(format!("{RESERVED_PREFIX}restore-{generation}")),
            old: dir.join(format!("{RESERVED_PREFIX}old-{generation}")),
            dir: dir.to_path_buf(),
            inside: true,
        };
        std::fs::create_dir(&staging.path).expect("mkdir");
        staging
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
        assert_eq!(
            names(root.path()),
            ["ckpt"],
            "only the checkpoint directory remains"
        );
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
        let staging = inside(&dir);
        std::fs::create_dir(staging.file_path("sub")).expect("mkdir");
        std::fs::write(staging.file_path("sub/new.bin"), b"new").expect("write");
        staging.swap_into_place().expect("swap");
        assert_eq!(names(&dir), ["sub"]);
        assert_eq!(
            std::fs::read(dir.join("sub/new.bin")).expect("read"),
            b"new"
        );
    }

    #[test]
    fn an_entry_swap_interrupted_while_moving_the_old_content_out_is_undone() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("a.bin"), b"old-a").expect("write");
        std::fs::write(dir.join("b.bin"), b"old-b").expect("write");
        let staging = inside(&dir);
        std::fs::write(staging.file_path("a.bin"), b"new-a").expect("write");
        // The crash: journal written, one old entry moved aside.
        std::fs::create_dir(&staging.old).expect("mkdir");
        write_journal(
            &dir,
            &Journal {
                phase: "out".into(),
                old: file_name(&staging.old),
                staging: file_name(&staging.path),
            },
        )
        .expect("journal");
        std::fs::rename(dir.join("a.bin"), staging.old.join("a.bin")).expect("move");
        let next = Staging::create(&dir, &generation()).expect("the next restore");
        next.discard();
        assert_eq!(names(&dir), ["a.bin", "b.bin"]);
        assert_eq!(std::fs::read(dir.join("a.bin")).expect("read"), b"old-a");
    }

    #[test]
    fn an_entry_swap_interrupted_while_moving_the_new_content_in_is_finished() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        std::fs::create_dir(&dir).expect("mkdir");
        let staging = inside(&dir);
        std::fs::write(staging.file_path("a.bin"), b"new-a").expect("write");
        std::fs::write(staging.file_path("b.bin"), b"new-b").expect("write");
        std::fs::create_dir(&staging.old).expect("mkdir");
        std::fs::write(staging.old.join("a.bin"), b"old-a").expect("write");
        write_journal(
            &dir,
            &Journal {
                phase: "in".into(),
                old: file_name(&staging.old),
                staging: file_name(&staging.path),
            },
        )
        .expect("journal");
        std::fs::rename(staging.file_path("a.bin"), dir.join("a.bin")).expect("move");
        let next = Staging::create(&dir, &generation()).expect("the next restore");
        next.discard();
        assert_eq!(names(&dir), ["a.bin", "b.bin"]);
        assert_eq!(std::fs::read(dir.join("b.bin")).expect("read"), b"new-b");
    }

    #[test]
    fn a_checkpoint_left_aside_between_two_renames_is_put_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        let old = root
            .path()
            .join(format!(".ckpt{RESERVED_PREFIX}old-{}", generation()));
        std::fs::create_dir(&old).expect("mkdir");
        std::fs::write(old.join("a.bin"), b"old").expect("write");
        let next = Staging::create(&dir, &generation()).expect("the next restore");
        next.discard();
        assert_eq!(std::fs::read(dir.join("a.bin")).expect("read"), b"old");
    }

    #[test]
    fn excluded_local_files_are_carried_into_the_new_content() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ckpt");
        std::fs::create_dir_all(dir.join("runs/today")).expect("mkdir");
        std::fs::write(dir.join("runs/today/events.out.tfevents.1"), b"log").expect("write");
        std::fs::write(dir.join("train.log"), b"lines").expect("write");
        std::fs::write(dir.join("checkpoint-1.bin"), b"old").expect("write");
        let staging = Staging::create(&dir, &generation()).expect("staging");
        std::fs::write(staging.file_path("checkpoint-2.bin"), b"new").expect("write");
        assert_eq!(
            staging.carry_excluded(&Excludes::default()).expect("carry"),
            2
        );
        staging.swap_into_place().expect("swap");
        assert_eq!(names(&dir), ["checkpoint-2.bin", "runs", "train.log"]);
        assert_eq!(
            std::fs::read(dir.join("runs/today/events.out.tfevents.1")).expect("read"),
            b"log"
        );
    }

    #[test]
    fn reads_mount_points_with_escaped_names_from_mountinfo() {
        let mountinfo = "22 1 8:1 / / rw - ext4 /dev/root rw\n\
            35 22 8:1 /var/lib/nerve /srv/ckpt\\040dir rw - ext4 /dev/root rw\n";
        let points: Vec<PathBuf> = mount_points(mountinfo).collect();
        assert_eq!(points, [PathBuf::from("/"), PathBuf::from("/srv/ckpt dir")]);
    }
}
