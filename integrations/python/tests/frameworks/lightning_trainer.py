"""A real Lightning run with NerveCallback, for the framework tests: a tiny linear model on CPU,
DDP over gloo with Lightning's own launcher when `--devices 2`. It prints one JSON line per event
of interest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from nerve_trainer.lightning import NerveCallback


def emit(event: str, trainer: Trainer, **fields) -> None:
    # One write per line: ranks that share a pipe (torchrun's stdout) never interleave within one.
    sys.stdout.write(json.dumps({"event": event, "rank": trainer.global_rank, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


class Regression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(100_000, 8, generator=generator)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class Pace(Callback):
    """Slows the steps down so that a signal lands mid-training, and reports progress."""

    def __init__(self, step_time: float) -> None:
        self.step_time = step_time

    def on_train_start(self, trainer, pl_module):
        emit("training", trainer, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.step_time)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    checkpoints = os.path.join(os.environ["NERVE_CHECKPOINT_DIR"], "checkpoints")
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            Pace(args.step_time),
            ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=args.save_steps, save_last=True),
            NerveCallback(),
        ],
    )
    trainer.fit(Regression(), ckpt_path="last" if args.resume else None)
    emit("finished", trainer, step=trainer.global_step)


if __name__ == "__main__":
    main()
