"""Nerve for Lightning: `Trainer(callbacks=[ModelCheckpoint(dirpath=..., save_last=True), NerveCallback()])`.

How it fits Lightning 2.x (`lightning.pytorch`):

- At every training batch end (`on_train_batch_end`, called on every rank) it asks the core
  whether to save; the answer is the same on every rank, and the save goes through
  `Trainer.save_checkpoint`, the Trainer's own machinery (callback and loop state included,
  every rank entering it as FSDP and DeepSpeed need), to `last-nerve.ckpt` beside
  ModelCheckpoint's files. Lightning's `fit(ckpt_path="last")` resumes from the newest file whose
  name starts with `last`, so it picks this one when it is the newest.
- ModelCheckpoint's own saves are marked `reason=periodic` at the next hook (ModelCheckpoint runs
  after every other callback, so its save of a batch is seen at the next batch end, epoch end or
  validation end), for the sidecar's background sync.
- SIGTERM: Lightning's own handler (installed when `fit` starts) stops the run at a batch end
  without saving, decides per rank (a rank that heard SIGTERM just after the agreement stops
  while the others wait for it), and in the releases up to 2.6.6 exits 0, which a Kubernetes Job counts as the
  training completed. So while training, this callback handles SIGTERM instead: the agreed save,
  its marker, then `SIGTERMException` with status 143 on every rank, raised from the hook, so
  `on_exception` callbacks still see it. Lightning restores the handlers when `fit` ends.

Importing this module imports lightning; `import nerve_trainer` alone does not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .coordinator import CheckpointOutsideDirectory, SaveCoordinator, install
from .marker import Reason

log = logging.getLogger("nerve_trainer")

# Starts with "last" so that `fit(ckpt_path="last")` finds it among ModelCheckpoint's last files;
# one fixed name, overwritten by each notice, so notice checkpoints never pile up in the store.
DEFAULT_FILENAME = "last-nerve.ckpt"


class NerveCallback(Callback):
    """Saves at the next batch end when the Nerve sidecar signals or SIGTERM arrives, with every
    rank agreeing on the step, and marks every checkpoint complete for the sidecar."""

    def __init__(
        self,
        dirpath: Optional[os.PathLike | str] = None,
        filename: str = DEFAULT_FILENAME,
        checkpoint_dir: Optional[os.PathLike | str] = None,
        coordinator: Optional[SaveCoordinator] = None,
    ) -> None:
        # Installed now, in the main thread, so a signal before training starts is recorded
        # rather than killing the process.
        self.nerve = coordinator if coordinator is not None else install(checkpoint_dir=checkpoint_dir)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        # The last ModelCheckpoint save already marked, per callback.
        self._marked_steps: Dict[int, int] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.nerve.active:
            return
        for directory in [self._directory(trainer), *(Path(cb.dirpath) for cb in self._model_checkpoints(trainer) if cb.dirpath)]:
            self._check_inside_checkpoint_dir(directory)
        # Lightning installed its SIGTERM handler just before this hook; ours replaces it for
        # the run (see the module doc).
        self.nerve.install_handlers(chain_previous=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark_model_checkpoint_saves(trainer)
        step = trainer.global_step
        if not self.nerve.should_save(step):
            return
        path = self._directory(trainer) / self.filename
        trainer.save_checkpoint(path)
        self._saved(trainer, step, path, reason=None)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._mark_model_checkpoint_saves(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._mark_model_checkpoint_saves(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark_model_checkpoint_saves(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning up to 2.6.6 raises SIGTERMException with no status, so the process exits 0
        # (fixed on its main branch by PR 21623, unreleased when this was written).
        if self.nerve.active and isinstance(exception, SIGTERMException) and exception.code in (None, 0):
            exception.code = self.nerve.exit_code

    # ---- internals -------------------------------------------------------------------------

    def _saved(self, trainer, step: int, path: Path, reason: Optional[Reason]) -> None:
        self._flush_async_checkpoint_io(trainer)
        self.nerve.saved(step, path, reason)
        if self.nerve.should_stop():
            log.info("nerve: checkpoint marked; ending the run for SIGTERM")
            stop = SIGTERMException()
            stop.code = self.nerve.exit_code
            raise stop

    def _mark_model_checkpoint_saves(self, trainer) -> None:
        if not self.nerve.active:
            return
        for index, callback in enumerate(self._model_checkpoints(trainer)):
            # ModelCheckpoint keeps the step and path of its last save on every rank.
            step = getattr(callback, "_last_global_step_saved", 0)
            path = getattr(callback, "_last_checkpoint_saved", "")
            if step and path and self._marked_steps.get(index) != step:
                self._marked_steps[index] = step
                self._saved(trainer, step, Path(path), reason=None)

    @staticmethod
    def _model_checkpoints(trainer):
        return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]

    def _directory(self, trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            return Path(checkpoint.dirpath)
        assert self.nerve.settings is not None
        return self.nerve.settings.checkpoint_dir

    def _check_inside_checkpoint_dir(self, directory: Path) -> None:
        assert self.nerve.settings is not None
        base = os.path.realpath(self.nerve.settings.checkpoint_dir)
        if os.path.commonpath([base, os.path.realpath(directory.absolute())]) != base:
            raise CheckpointOutsideDirectory(
                f"checkpoints go to {directory}, outside {self.nerve.settings.checkpoint_dir}, the "
                "directory the Nerve sidecar uploads (NERVE_CHECKPOINT_DIR): give ModelCheckpoint "
                "(and NerveCallback) a dirpath inside it"
            )

    @staticmethod
    def _flush_async_checkpoint_io(trainer) -> None:
        """With AsyncCheckpointIO, `save_checkpoint` returns before the file is written; its
        teardown waits for the pending writes (it starts a new executor at the next save)."""
        checkpoint_io = getattr(trainer.strategy, "checkpoint_io", None)
        if isinstance(checkpoint_io, AsyncCheckpointIO):
            checkpoint_io.teardown()
