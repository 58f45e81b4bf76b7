"""The core: hear the sidecar's signal and SIGTERM, agree across ranks on a step to save, and mark
the saved checkpoint complete.

The signal handlers only record the request (a signal handler runs between two bytecodes of
whatever the trainer was doing, possibly in the middle of writing a tensor or inside a
collective: saving there would tear the checkpoint or hang the job). The trainer asks
`should_save(step)` at each step boundary, on every rank; the ranks all-reduce what they heard
(MAX), so they all answer the same, enter the save together and call `saved(step, path)`
together, which makes the files durable and writes the done marker.

SIGTERM (a drain, the pod deleted, torchrun forwarding its own SIGTERM) is a request that also
ends the run: after that save `should_stop()` is true on every rank, and `stop()` exits with
128 + SIGTERM, the status of a process ended by SIGTERM: never 0, which a Kubernetes Job would
count as the training having completed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from .agreement import Collective, SingleProcess, job_collective
from .marker import Marker, Reason, make_durable, write_marker
from .settings import Settings

log = logging.getLogger("nerve_trainer")

# Exit status after the save that answers SIGTERM: what a process ended by SIGTERM reports
# (128 + 15). A Kubernetes Job counts exit 0 as "completed"; the job must be resumed instead.
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM

# A notice signal this soon after the ranks saved for a notice is that same notice, arriving late
# through this node's sidecar: in a multi-pod job the ranks agree on the save as soon as one of
# them is signalled, while the other pods' sidecars learn of the notice from the store within a
# poll (2 s by default) and signal their trainers too. Saving again for it would cost the whole
# job a second checkpoint inside the notice window. 30 s is many polls, and far less than the
# time between two real notices. SIGTERM is never taken as answered: it also ends the run.
NOTICE_ANSWERED_WINDOW = 30.0


class Request(IntEnum):
    """What the trainer has been asked; ranks agree on the MAX."""

    NONE = 0
    # The sidecar's notice signal: save at the next step boundary, then keep training.
    SAVE = 1
    # SIGTERM: save at the next step boundary (or finish the save in progress), then exit.
    SAVE_AND_STOP = 2


class CheckpointOutsideDirectory(ValueError):
    """A checkpoint was saved where the sidecar does not look."""


class StepDisagreement(RuntimeError):
    """Ranks called `saved` with different steps: the checkpoint is not one step of the job."""


@dataclass
class _Heard:
    """Requests heard by the signal handlers; only ever incremented there."""

    count: int = 0
    level: Request = Request.NONE
    first_at: Optional[float] = None
    signal_name: str = ""


class SaveCoordinator:
    """One per process. Build it with `install()`."""

    def __init__(
        self,
        settings: Optional[Settings],
        collective: Optional[Collective] = None,
        exit_code: int = TERMINATED_EXIT_CODE,
    ) -> None:
        self.settings = settings
        self.exit_code = exit_code
        self._explicit_collective = collective
        self._torch_collective: Optional[Collective] = None
        self._heard = _Heard()
        # Requests up to this count are answered by a save already marked.
        self._answered = 0
        # When the last save answering a notice was agreed (monotonic seconds).
        self._answered_at: Optional[float] = None
        # The level all ranks agreed on in `should_save`, until `saved` is called.
        self._agreed: Optional[Request] = None
        self._stopping = False
        self._previous_handlers: Dict[int, object] = {}

    @property
    def active(self) -> bool:
        """True under Nerve (a checkpoint directory is known)."""
        return self.settings is not None

    # ---- signal handling ------------------------------------------------------------------

    def install_handlers(self, chain_previous: bool = True) -> None:
        """Installs the handlers; the main thread only (Python's rule for `signal.signal`).

        A handler found in place is called after ours records the request (`chain_previous`);
        `chain_previous=False` replaces it instead, keeping what ours chained to before (for a
        framework whose own SIGTERM handling would stop the run without the save).
        """
        if not self.active:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "nerve_trainer.install() must run in the main thread: Python delivers signals "
                "there only. Call it at the start of the training script."
            )
        assert self.settings is not None
        wanted = {self.settings.notice_signal: Request.SAVE, signal.SIGTERM: Request.SAVE_AND_STOP}
        for signum, level in wanted.items():
            current = signal.getsignal(signum)
            if getattr(current, "nerve_coordinator", None) is self:
                continue
            if chain_previous:
                self._previous_handlers[signum] = current
            signal.signal(signum, self._handler_for(level))

    def _handler_for(self, level: Request) -> Callable:
        def record(signum: int, frame) -> None:
            # Only assignments: no I/O, no locks, no collectives (see the module doc).
            heard = self._heard
            heard.count += 1
            if level > heard.level:
                heard.level = level
            if heard.first_at is None:
                heard.first_at = time.monotonic()
                heard.signal_name = signal.Signals(signum).name
            previous = self._previous_handlers.get(signum)
            if callable(previous):
                previous(signum, frame)

        record.nerve_coordinator = self  # type: ignore[attr-defined]  (see install_handlers)
        return record

    def request(self, level: Request = Request.SAVE) -> None:
        """Records a request as the signal handler would (for trainers with their own trigger)."""
        self._heard.count += 1
        self._heard.level = max(self._heard.level, level)
        if self._heard.first_at is None:
            self._heard.first_at = time.monotonic()
            self._heard.signal_name = "request()"

    # ---- the step boundary -----------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """At a step boundary, on every rank: True when the job must save now.

        Collective under torch.distributed (an all-reduce): every rank calls it at the same
        steps. Once it said True it keeps saying True, without communicating, until `saved`.
        """
        if not self.active:
            return False
        if self._agreed is not None:
            return True
        agreed = Request(self._collective().all_reduce_max([self._pending_level()])[0])
        if agreed == Request.NONE:
            return False
        self._agreed = agreed
        waited = self._since_first_request()
        log.info(
            "nerve: saving at step %d for %s%s",
            step,
            "a notice" if agreed == Request.SAVE else "SIGTERM (save, then exit)",
            f" ({waited:.2f}s after {self._heard.signal_name})" if waited is not None else " (heard by another rank)",
        )
        return True

    def saved(self, step: int, path: os.PathLike | str, reason: Optional[Reason] = None) -> Optional[Marker]:
        """After every rank finished writing the checkpoint of `step` at `path` (a directory or a
        file under the checkpoint directory), on every rank: makes it durable and writes the done
        marker. Returns the marker written by this process, if any.

        Collective under torch.distributed (an all-reduce that is also the barrier making sure
        every rank's files are written). `reason` defaults to `notice` when the save answers a
        request (agreed in `should_save`, or heard by any rank while this save was being written)
        and `periodic` otherwise.
        """
        if not self.active:
            return None
        assert self.settings is not None
        checkpoint = Path(path).absolute()
        relative = self._relative_to_checkpoint_dir(checkpoint)
        offered = self._agreed if self._agreed is not None else Request.NONE
        heard_count = self._heard.count
        pending = max(offered, self._pending_level())
        collective = self._collective()
        highest, negated_lowest, level = collective.all_reduce_max([step, -step, int(pending)])
        if highest != -negated_lowest:
            raise StepDisagreement(
                f"ranks saved different steps (from {-negated_lowest} to {highest}); call "
                "should_save(step) at the same steps on every rank and save only when it says so"
            )
        agreed = Request(level)
        self._agreed = None
        if agreed > Request.NONE:
            self._answered = heard_count
            self._answered_at = time.monotonic()
            if self._heard.count == heard_count:
                # The next request's wait is measured from its own signal.
                self._heard.first_at = None
        if reason is None:
            reason = Reason.NOTICE if agreed > Request.NONE else Reason.PERIODIC
        if agreed == Request.SAVE_AND_STOP:
            self._stopping = True
        marker = None
        # One writer per node: the node-local rank 0, after the all-reduce above proved every
        # rank's files written. fsync flushes a file's pages whoever wrote them.
        if collective.local_rank == 0:
            started = time.monotonic()
            files = make_durable(checkpoint, self.settings.checkpoint_dir)
            marker = Marker(step=step, reason=reason, rank=collective.rank, path=relative)
            write_marker(self.settings.done_marker, marker)
            log.info(
                "nerve: checkpoint of step %d at %s marked complete (%s, %d files synced in %.2fs)",
                step,
                relative,
                reason.value,
                files,
                time.monotonic() - started,
            )
        return marker

    def should_stop(self) -> bool:
        """True on every rank once the save answering SIGTERM is marked: end the run now."""
        return self._stopping

    def stop(self) -> None:
        """Ends the process after the SIGTERM save, with `exit_code` (128 + SIGTERM by default)."""
        log.info("nerve: checkpoint marked; exiting with status %d for SIGTERM", self.exit_code)
        raise SystemExit(self.exit_code)

    # ---- internals -------------------------------------------------------------------------

    def _pending_level(self) -> Request:
        if self._heard.count <= self._answered:
            return Request.NONE
        answered_lately = (
            self._answered_at is not None
            and time.monotonic() - self._answered_at < NOTICE_ANSWERED_WINDOW
        )
        if self._heard.level == Request.SAVE and answered_lately:
            log.info("nerve: a notice signal right after the save for a notice: already answered")
            self._answered = self._heard.count
            self._heard.first_at = None
            return Request.NONE
        return self._heard.level

    def _since_first_request(self) -> Optional[float]:
        if self._heard.first_at is None or self._heard.count <= self._answered:
            return None
        return time.monotonic() - self._heard.first_at

    def _collective(self) -> Collective:
        if self._explicit_collective is not None:
            return self._explicit_collective
        if self._torch_collective is None:
            self._torch_collective = job_collective()
        return self._torch_collective or SingleProcess()

    def _relative_to_checkpoint_dir(self, checkpoint: Path) -> str:
        assert self.settings is not None
        base = os.path.realpath(self.settings.checkpoint_dir)
        target = os.path.realpath(checkpoint)
        if os.path.commonpath([base, target]) != base:
            raise CheckpointOutsideDirectory(
                f"the checkpoint {checkpoint} is outside {self.settings.checkpoint_dir}, the directory "
                "the Nerve sidecar uploads (NERVE_CHECKPOINT_DIR): save under it (for example "
                "output_dir or dirpath inside it) or the checkpoint will not reach the store"
            )
        return os.path.relpath(target, base)


_installed: Optional[SaveCoordinator] = None
_not_under_nerve_said = False


def install(
    checkpoint_dir: Optional[os.PathLike | str] = None,
    done_marker: Optional[os.PathLike | str] = None,
    notice_signal=None,
    collective: Optional[Collective] = None,
    exit_code: int = TERMINATED_EXIT_CODE,
    environ: Optional[Mapping[str, str]] = None,
) -> SaveCoordinator:
    """Installs the signal handlers and returns the process's coordinator (also used by the
    module-level `should_save`, `saved`, `should_stop`). Idempotent.

    Settings come from the arguments, else from the environment the Nerve injector sets
    (`NERVE_CHECKPOINT_DIR`, `NERVE_DONE_MARKER`, `NERVE_SIGNAL`). Without a checkpoint directory
    the trainer is not running under Nerve: nothing is installed and every call is a no-op.
    """
    global _installed, _not_under_nerve_said
    if _installed is not None:
        return _installed
    settings = Settings.resolve(
        os.environ if environ is None else environ,
        checkpoint_dir=checkpoint_dir,
        done_marker=done_marker,
        notice_signal=notice_signal,
    )
    coordinator = SaveCoordinator(settings, collective=collective, exit_code=exit_code)
    if settings is None:
        if not _not_under_nerve_said:
            log.warning(
                "nerve: NERVE_CHECKPOINT_DIR is not set, so this is not running under Nerve; "
                "checkpoints are neither requested by signal nor marked"
            )
            _not_under_nerve_said = True
    else:
        coordinator.install_handlers()
        log.info(
            "nerve: %s and SIGTERM request a checkpoint; marker %s",
            settings.notice_signal.name,
            settings.done_marker,
        )
    _installed = coordinator
    return coordinator


def installed() -> SaveCoordinator:
    """The coordinator `install()` made (installing it with the defaults if needed)."""
    return _installed if _installed is not None else install()


def should_save(step: int) -> bool:
    """`SaveCoordinator.should_save` of the installed coordinator."""
    return installed().should_save(step)


def saved(step: int, path: os.PathLike | str, reason: Optional[Reason] = None) -> Optional[Marker]:
    """`SaveCoordinator.saved` of the installed coordinator."""
    return installed().saved(step, path, reason)


def should_stop() -> bool:
    """`SaveCoordinator.should_stop` of the installed coordinator."""
    return installed().should_stop()


def stop() -> None:
    """`SaveCoordinator.stop` of the installed coordinator."""
    installed().stop()

