"""One rank of a test training job, run as its own process by the tests.

It trains in fixed-time steps, asks `should_save(step)` at every step boundary, writes a
checkpoint of every rank's state under `checkpoint-N/` when told (slowly if asked, so a signal can
land mid-save), calls `saved`, and stops after the SIGTERM save. It prints one JSON line per event.

Agreement goes through torch.distributed (gloo) with `--backend gloo`, else through the tests'
file stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nerve_trainer
from file_collective import FileCollective


def emit(event: str, **fields) -> None:
    # One write per line: ranks that share a pipe (torchrun's stdout) never interleave within one.
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--local-rank", type=int, default=0)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--backend", choices=["file", "gloo"], default="file")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--step-time", type=float, default=0.01)
    parser.add_argument("--save-every", type=int, default=0, help="periodic saves; 0: none")
    parser.add_argument("--file-pause", type=float, default=0.0, help="pause before each file of a save")
    parser.add_argument("--steps-after-notice-save", type=int, default=-1,
                        help="exit 0 this many steps after a notice save; -1: keep training")
    args = parser.parse_args()

    collective = None
    if args.backend == "gloo":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{args.store / 'gloo-rendezvous'}",
            rank=args.rank,
            world_size=args.world_size,
        )
    elif args.world_size > 1:
        collective = FileCollective(args.store, args.rank, args.world_size, args.local_rank)
    nerve = nerve_trainer.install(collective=collective)
    emit("started", pid=os.getpid(), active=nerve.active)

    exit_at = None
    for step in range(1, args.steps + 1):
        time.sleep(args.step_time)
        periodic = args.save_every > 0 and step % args.save_every == 0
        # should_save first: it is collective, every rank calls it at every step.
        requested = nerve.should_save(step)
        if requested or periodic:
            directory = Path(os.environ.get("NERVE_CHECKPOINT_DIR", args.store)) / f"checkpoint-{step}"
            directory.mkdir(parents=True, exist_ok=True)
            emit("saving", step=step)
            for part in ("model", "optimizer"):
                time.sleep(args.file_pause)
                (directory / f"{part}-rank{args.rank}.bin").write_bytes(f"{part} {step} {args.rank}\n".encode() * 1000)
            marker = nerve.saved(step, directory)
            emit("saved", step=step, marker=None if marker is None else marker.render())
            if requested and args.steps_after_notice_save >= 0 and exit_at is None:
                exit_at = step + args.steps_after_notice_save
        if nerve.should_stop():
            emit("stopping", step=step)
            nerve.stop()
        if exit_at is not None and step >= exit_at:
            emit("finished", step=step)
            return
    emit("finished", step=args.steps)


if __name__ == "__main__":
    sys.exit(main())
