"""A plain PyTorch training loop made Nerve-ready with torch.distributed.checkpoint (DCP).

    torchrun --nproc-per-node 2 examples/plain_pytorch.py --steps 1000

Runs on CPU (gloo) or GPUs (nccl). Under Nerve (NERVE_CHECKPOINT_DIR set by the injector) it saves
`step-N/` there every --save-every steps and whenever the sidecar signals or the pod is stopped,
every rank at the same step; on start it resumes from the newest complete checkpoint (the one
the sidecar restored). Outside Nerve it trains and saves periodically under ./checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

import nerve_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=100)
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    # 1. Install the handlers first thing: a signal before this would end the process.
    nerve = nerve_trainer.install()
    root = nerve.settings.checkpoint_dir if nerve.active else Path("checkpoints")

    model = DistributedDataParallel(torch.nn.Linear(16, 16).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    # 2. Resume from the newest complete checkpoint: DCP writes `.metadata` last, so a directory
    #    without it is torn. After `nerve-sidecar restore` it is the step the interrupted run saved.
    start = 0
    complete = [int(p.name[len("step-"):]) for p in root.glob("step-*") if (p / ".metadata").exists()]
    if complete:
        start = max(complete)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=root / f"step-{start}")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    report("resumed", step=start)

    for step in range(start + 1, args.steps + 1):
        x = torch.randn(32, 16, device=device)
        loss = (model(x) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # 3. At the step boundary, on every rank, every step: should_save is collective (the
        #    ranks agree), so call it first, before any condition that could skip it.
        if nerve.should_save(step) or step % args.save_every == 0:
            path = root / f"step-{step}"
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
            # 4. Every rank, after the save: fsync, then the done marker (node-local rank 0).
            nerve.saved(step, path)
            report("saved", step=step)
        # 5. After the save that answered SIGTERM: leave now, with status 143.
        if nerve.should_stop():
            nerve.stop()
    report("finished", step=args.steps)
    dist.destroy_process_group()


def report(event: str, **fields) -> None:
    # One write per line: ranks that share a pipe (torchrun's stdout) never interleave within one.
    sys.stdout.write(json.dumps({"event": event, "rank": dist.get_rank(), "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
