"""Making a saved checkpoint durable and writing the done marker the sidecar waits for.

Order matters: every file and directory of the checkpoint is fsynced first, then the directories
leading to it, and only then the marker appears (written under a temporary name, fsynced, renamed
into place, its directory fsynced). A sidecar that sees the marker can upload the checkpoint; a
machine that loses power before the marker is renamed leaves the previous marker, never a marker
naming a torn checkpoint.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional


# Top-level names starting with this are the sidecar's own and never part of a generation: the
# marker's temporary file is never uploaded, even by a scan that lands mid-write. (The default
# marker, `.nerve-done`, has the prefix too: the marker is not restored with the checkpoint.)
TEMPORARY_PREFIX = ".nerve-tmp-"


class Reason(str, Enum):
    """Why a checkpoint was saved, as the marker tells the sidecar."""

    # The save answers a request: the sidecar's signal (a notice) or SIGTERM (a drain).
    NOTICE = "notice"
    # The trainer's own schedule; the sidecar's background sync uploads it ahead of any notice.
    PERIODIC = "periodic"


@dataclass(frozen=True)
class Marker:
    """The done marker's content: one `key=value` per line."""

    step: int
    reason: Reason
    rank: Optional[int] = None
    # The checkpoint's path relative to the checkpoint directory the sidecar uploads.
    path: Optional[str] = None

    def render(self) -> str:
        lines = [f"step={self.step}", f"reason={self.reason.value}"]
        if self.rank is not None:
            lines.append(f"rank={self.rank}")
        if self.path is not None:
            lines.append(f"path={self.path}")
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> "Marker":
        """The marker written by `render` (for resuming and for tests)."""
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip()
        if "step" not in fields:
            raise ValueError(f"done marker without a step: {text!r}")
        return cls(
            step=int(fields["step"]),
            reason=Reason(fields.get("reason", Reason.PERIODIC.value)),
            rank=int(fields["rank"]) if "rank" in fields else None,
            path=fields.get("path"),
        )


def make_durable(checkpoint: Path, up_to: Path) -> int:
    """fsyncs every file and directory under `checkpoint` (a directory or one file), then each
    directory from its parent up to and including `up_to`, so the entries naming it survive a
    crash too. Returns the number of files synced. Symbolic links are not followed.
    """
    synced = 0
    if checkpoint.is_dir() and not checkpoint.is_symlink():
        for root, _dirs, files in os.walk(checkpoint, topdown=False):
            for name in files:
                path = Path(root, name)
                if path.is_symlink() or not path.is_file():
                    continue
                _fsync(path)
                synced += 1
            _fsync_directory(Path(root))
    elif checkpoint.is_file():
        _fsync(checkpoint)
        synced += 1
    directory = checkpoint.parent
    up_to = up_to.resolve()
    while True:
        _fsync_directory(directory)
        if directory.resolve() == up_to or directory.parent == directory:
            break
        directory = directory.parent
    return synced


def write_marker(marker_path: Path, marker: Marker) -> None:
    """Writes the marker atomically and durably: temp file, fsync, rename, fsync of the directory.

    The temporary name starts with the prefix the sidecar never uploads, and is unique per host
    and process, so several writers of the same marker path
    (node-local rank 0 of every node on a shared file system) never interleave their bytes: the
    last rename wins, and they all carry the same step.
    """
    marker_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = marker_path.with_name(
        f"{TEMPORARY_PREFIX}{marker_path.name}.{socket.gethostname()}.{os.getpid()}"
    )
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(descriptor, marker.render().encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, marker_path)
    _fsync_directory(marker_path.parent)


def read_marker(marker_path: Path) -> Optional[Marker]:
    """The marker at `marker_path`, or None when there is none."""
    try:
        return Marker.parse(marker_path.read_text())
    except FileNotFoundError:
        return None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
