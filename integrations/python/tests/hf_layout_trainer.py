"""A trainer that writes checkpoints the way the Hugging Face Trainer lays them out, using the
nerve_trainer core, for the end-to-end tests with the real sidecar (tests/tests/trainer_python.rs).

Each checkpoint is `checkpoint-N/` under --dir with weight and optimizer files whose bytes follow
from the step, and `trainer_state.json` (`{"global_step": N}`) written last. It prints one JSON
line per event: started, saving, checkpoint, exit; with --verify it checks the newest complete
checkpoint (after a restore) byte for byte and prints `resumed`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import nerve_trainer

# The state files of a checkpoint, written in this order; trainer_state.json comes after them.
STATE_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def state_bytes(name: str, step: int, size: int) -> bytes:
    """The content of one state file at one step: different per file and per step."""
    seed = hashlib.sha256(f"{name}@{step}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def save(directory: Path, step: int, size: int, file_pause: float) -> Path:
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        time.sleep(file_pause)
        (checkpoint / name).write_bytes(state_bytes(name, step, size))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def newest_checkpoint(directory: Path):
    """The newest complete `checkpoint-N/` (one with trainer_state.json), as the Hugging Face
    Trainer's `resume_from_checkpoint=True` picks it. The done marker is not restored with the
    checkpoint (its name is the sidecar's own), so resuming never depends on it."""
    complete = [
        (int(path.name.split("-", 1)[1]), path)
        for path in directory.glob("checkpoint-*")
        if path.name.split("-", 1)[1].isdigit() and (path / "trainer_state.json").exists()
    ]
    return max(complete, default=None)


def verify(directory: Path, size: int) -> int:
    newest = newest_checkpoint(directory)
    if newest is None:
        emit("verify-failed", reason="no complete checkpoint-N/")
        return 1
    step, checkpoint = newest
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    wrong = [name for name in STATE_FILES if (checkpoint / name).read_bytes() != state_bytes(name, step, size)]
    if state["global_step"] != step or wrong:
        emit("verify-failed", step=step, global_step=state["global_step"], wrong=wrong)
        return 1
    emit("resumed", step=step, path=checkpoint.name)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per state file")
    parser.add_argument("--step-time", type=float, default=0.01)
    parser.add_argument("--file-pause", type=float, default=0.0, help="pause before each state file")
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()

    if args.verify:
        return verify(args.dir, args.size)
    nerve = nerve_trainer.install(checkpoint_dir=args.dir)
    emit("started", pid=os.getpid())
    step = 0
    while True:
        step += 1
        time.sleep(args.step_time)
        if nerve.should_save(step):
            emit("saving", step=step)
            checkpoint = save(args.dir, step, args.size, args.file_pause)
            marker = nerve.saved(step, checkpoint)
            emit("checkpoint", step=step, reason=marker.reason.value, path=str(checkpoint))
        if nerve.should_stop():
            emit("exit", step=step, code=nerve.exit_code)
            nerve.stop()


if __name__ == "__main__":
    sys.exit(main())
