"""Where the sidecar looks, read from the environment the Nerve injector sets in the trainer
container: the checkpoint directory it uploads, the done marker it waits for, and the signal it
sends on a notice.

Nothing here touches the file system or installs anything; it only answers "are we under Nerve,
and where does the marker go".
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

# The directory the sidecar uploads (the injector sets it from `nerve.io/checkpoint-dir`).
ENV_CHECKPOINT_DIR = "NERVE_CHECKPOINT_DIR"
# The done marker, relative to the checkpoint directory or absolute.
ENV_DONE_MARKER = "NERVE_DONE_MARKER"
# The signal the sidecar sends on a notice (`nerve.io/signal`).
ENV_SIGNAL = "NERVE_SIGNAL"

# The sidecar's default marker: a hidden file directly inside the checkpoint directory, so it is
# never mistaken for checkpoint content by a trainer that globs `checkpoint-*`.
DEFAULT_DONE_MARKER = ".nerve-done"
# The sidecar's default notice signal: unused by Python, torchrun and the common trainers.
DEFAULT_SIGNAL = signal.SIGUSR1


class SettingsError(ValueError):
    """A Nerve setting in the environment or an argument cannot be used."""


@dataclass(frozen=True)
class Settings:
    """What the integration needs to know about the sidecar."""

    checkpoint_dir: Path
    done_marker: Path
    notice_signal: signal.Signals

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str],
        checkpoint_dir: Optional[os.PathLike | str] = None,
        done_marker: Optional[os.PathLike | str] = None,
        notice_signal: Optional[signal.Signals | int | str] = None,
    ) -> Optional["Settings"]:
        """Settings from explicit arguments first, then the environment.

        Returns None when no checkpoint directory is known: not running under Nerve.
        """
        directory = checkpoint_dir if checkpoint_dir is not None else environ.get(ENV_CHECKPOINT_DIR)
        if directory is None or str(directory) == "":
            return None
        directory = Path(directory).absolute()
        marker = done_marker if done_marker is not None else environ.get(ENV_DONE_MARKER)
        if marker is None or str(marker) == "":
            marker = DEFAULT_DONE_MARKER
        marker = Path(marker)
        if not marker.is_absolute():
            marker = directory / marker
        chosen = notice_signal if notice_signal is not None else environ.get(ENV_SIGNAL)
        return cls(
            checkpoint_dir=directory,
            done_marker=marker,
            notice_signal=DEFAULT_SIGNAL if chosen is None else parse_signal(chosen),
        )


def parse_signal(value: signal.Signals | int | str) -> signal.Signals:
    """A signal from a name (`SIGUSR1`, `usr1`) or a number, as the sidecar's `--signal` takes it."""
    if isinstance(value, signal.Signals):
        found = value
    else:
        text = str(value).strip().upper()
        try:
            found = signal.Signals(int(text))
        except ValueError:
            name = text if text.startswith("SIG") else f"SIG{text}"
            try:
                found = signal.Signals[name]
            except KeyError:
                raise SettingsError(
                    f"{ENV_SIGNAL}={value!r} is not a signal name; use e.g. SIGUSR1, SIGUSR2 or SIGTERM"
                ) from None
    if found in (signal.SIGKILL, signal.SIGSTOP):
        raise SettingsError(
            f"{ENV_SIGNAL}={value!r} cannot be handled by a trainer; use a signal it can catch, such as SIGUSR1"
        )
    return found
