"""Nerve for the Hugging Face Trainer: `Trainer(..., callbacks=[NerveCallback()])`.

How it fits the Trainer's loop (transformers 4.x and 5.x): after each optimizer step the Trainer
calls `on_step_end` on every rank, then saves when `control.should_save` is set (`checkpoint-N/`
under the run's output directory: weights, optimizer, scheduler, RNG states, then
`trainer_state.json`, then the rotation that `save_total_limit` asks for), then calls `on_save`
on every rank. So:

- `on_step_end` asks the core whether to save (the all-reduce that makes every rank agree) and
  sets `control.should_save`: every rank enters the same save, which DeepSpeed and FSDP need.
- `on_save` marks `checkpoint-N/` complete (every rank; the node-local rank 0 writes the marker),
  after the rotation, so the marker never names a directory the rotation is about to delete.
  Periodic saves get `reason=periodic` markers (for the sidecar's background sync).
- After the save that answers SIGTERM it exits at once (status 143) instead of letting the Trainer
  finish: the Trainer's end of training can load the best model and, with `save_total_limit=1`,
  delete every checkpoint but the best one, including the one just marked.

Importing this module imports transformers; `import nerve_trainer` alone does not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from .coordinator import CheckpointOutsideDirectory, SaveCoordinator, install

log = logging.getLogger("nerve_trainer")

# The Trainer's name for its checkpoint folders (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR).
CHECKPOINT_PREFIX = "checkpoint"


class NerveCallback(TrainerCallback):
    """Saves at the next optimizer step when the Nerve sidecar signals or SIGTERM arrives, with
    every rank agreeing on the step, and marks every `checkpoint-N/` complete for the sidecar.

    Works with `save_total_limit`, `save_on_each_node`, `save_strategy="no"` (notice saves
    still happen) and DeepSpeed/FSDP sharded saves.
    """

    def __init__(self, checkpoint_dir: Optional[os.PathLike | str] = None, coordinator: Optional[SaveCoordinator] = None):
        # Installed now, in the main thread, so a signal before training starts is recorded
        # rather than killing the process.
        self.nerve = coordinator if coordinator is not None else install(checkpoint_dir=checkpoint_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.nerve.active:
            return
        if getattr(args, "enable_jit_checkpoint", False):
            raise ValueError(
                "TrainingArguments(enable_jit_checkpoint=True) and NerveCallback both handle SIGTERM, "
                "and the JIT checkpoint decides on each rank alone (a sharded save then hangs): "
                "set enable_jit_checkpoint=False and let NerveCallback save on SIGTERM"
            )
        output = Path(args.output_dir).absolute()
        base = self.nerve.settings.checkpoint_dir
        if os.path.commonpath([os.path.realpath(base), os.path.realpath(output)]) != os.path.realpath(base):
            raise CheckpointOutsideDirectory(
                f"TrainingArguments(output_dir={args.output_dir!r}) is outside {base}, the directory the "
                "Nerve sidecar uploads (NERVE_CHECKPOINT_DIR): set output_dir inside it"
            )
        world_size = getattr(args, "world_size", 1)
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size > local_world_size and not args.save_on_each_node and args.process_index == 0:
            log.warning(
                "nerve: %d ranks on several nodes without save_on_each_node: only the first node "
                "writes the model and trainer state, so the other nodes' pods hold no full "
                "checkpoint. With node-local disks set save_on_each_node=True.",
                world_size,
            )
        # Re-installed in case something replaced the handlers since the callback was built.
        self.nerve.install_handlers()

    def on_step_end(self, args, state, control, **kwargs):
        if self.nerve.should_save(state.global_step):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if not self.nerve.active:
            return
        step = state.global_step
        self.nerve.saved(step, Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{step}")
        if self.nerve.should_stop():
            self.nerve.stop()
