"""A real Hugging Face Trainer run with NerveCallback, for the framework tests: a tiny GPT-2
built from a config (no download), CPU, DDP over gloo when started by torchrun. It prints one
JSON line per event of interest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from nerve_trainer.huggingface import NerveCallback


def emit(event: str, **fields) -> None:
    # One write per line: ranks that share a pipe (torchrun's stdout) never interleave within one.
    sys.stdout.write(json.dumps({"event": event, "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 100_000

    def __getitem__(self, index: int) -> dict:
        ids = torch.tensor([(index * 7 + i) % 64 for i in range(16)])
        return {"input_ids": ids, "labels": ids}


class Pace(TrainerCallback):
    """Slows the steps down so that a signal lands mid-training, and reports progress."""

    def __init__(self, step_time: float) -> None:
        self.step_time = step_time

    def on_train_begin(self, args, state, control, **kwargs):
        emit("training", step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.step_time)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            emit("saved", step=state.global_step)
            return
        # What rank 0 (which writes the trainer state and rotates) has on disk when the Trainer
        # hands the save to the callbacks.
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            state_step = json.load(f)["global_step"]
        present = sorted(name for name in os.listdir(args.output_dir) if name.startswith("checkpoint-"))
        emit("saved", step=state.global_step, state_step=state_step, checkpoints=present)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    training = TrainingArguments(
        output_dir=os.path.join(os.environ["NERVE_CHECKPOINT_DIR"], "run"),
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        save_total_limit=1,
        per_device_train_batch_size=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=[Pace(args.step_time), NerveCallback()])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    emit("finished", step=trainer.state.global_step)


if __name__ == "__main__":
    main()
