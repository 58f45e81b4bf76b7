"""Make a training script Nerve-ready: save at a safe step when the Nerve sidecar asks (a Spot
notice) or Kubernetes stops the pod (SIGTERM), with every rank agreeing on the step, and tell the
sidecar when the checkpoint is complete.

    import nerve_trainer
    nerve_trainer.install()                     # at the start, in the main thread
    for step in ...:
        train_step()
        if nerve_trainer.should_save(step) or step % 1000 == 0:   # every rank, every step
            path = save_checkpoint(step)
            nerve_trainer.saved(step, path)     # every rank, after the save
        if nerve_trainer.should_stop():
            nerve_trainer.stop()                # after the SIGTERM save: exit 143

Hugging Face: `nerve_trainer.huggingface.NerveCallback`; Lightning:
`nerve_trainer.lightning.NerveCallback`. Importing this package imports only the standard
library; torch is used only when the trainer already imported it and initialised
torch.distributed.

Outside Nerve (no `NERVE_CHECKPOINT_DIR`) every call is a no-op.
"""

from .agreement import Collective, SingleProcess
from .coordinator import (
    TERMINATED_EXIT_CODE,
    CheckpointOutsideDirectory,
    Request,
    SaveCoordinator,
    StepDisagreement,
    install,
    installed,
    saved,
    should_save,
    should_stop,
    stop,
)
from .marker import Marker, Reason, read_marker
from .settings import Settings, SettingsError

__all__ = [
    "TERMINATED_EXIT_CODE",
    "CheckpointOutsideDirectory",
    "Collective",
    "Marker",
    "Reason",
    "Request",
    "SaveCoordinator",
    "Settings",
    "SettingsError",
    "SingleProcess",
    "StepDisagreement",
    "install",
    "installed",
    "read_marker",
    "saved",
    "should_save",
    "should_stop",
    "stop",
]
