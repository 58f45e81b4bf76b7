"""How ranks agree: an element-wise MAX all-reduce of a few integers across every process of the job.

A notice reaches one node's trainer processes, a drain's SIGTERM one pod's; but a distributed save
is a collective (torch.distributed.checkpoint, DeepSpeed, FSDP): every rank must enter it at the
same step or the job hangs. So no rank ever decides alone: at a step boundary each rank offers
what it heard and every rank acts on the MAX.

`torch.distributed` is used when the trainer initialised it (torch is never imported here unless
the trainer already imported it). Trainers on other stacks (mpi4py, Horovod, JAX) pass their own
object with the same two members to `install(collective=...)`.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Protocol, Sequence


class Collective(Protocol):
    """What the integration needs from the job's process group."""

    # This process's place: `rank` in the whole job, `local_rank` on its node.
    rank: int
    local_rank: int

    def all_reduce_max(self, values: Sequence[int]) -> List[int]:
        """Element-wise MAX of `values` over every rank; every rank gets the same answer.
        It returns only once every rank has called it, so it is a barrier too."""
        ...


class SingleProcess:
    """The job is this one process: nothing to agree with."""

    rank = 0
    local_rank = 0

    def all_reduce_max(self, values: Sequence[int]) -> List[int]:
        return list(values)


class TorchDistributed:
    """The default process group of `torch.distributed`, on the device its backend needs."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self.rank = dist.get_rank()
        # torchrun, Lightning, accelerate and the DeepSpeed launcher all set LOCAL_RANK; without it
        # every process counts as the first on its node and writes the (identical) marker itself.
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._device = _device_for_backend(torch, str(dist.get_backend()))

    def all_reduce_max(self, values: Sequence[int]) -> List[int]:
        tensor = self._torch.tensor(list(values), dtype=self._torch.int64, device=self._device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX)
        # `.tolist()` waits for the collective to finish, also on an accelerator's stream.
        return [int(value) for value in tensor.tolist()]


def _device_for_backend(torch, backend: str):
    """gloo and MPI reduce CPU tensors; a mixed `cpu:gloo,cuda:nccl` group too. NCCL (and the other
    accelerator-only backends) needs the tensor on this process's accelerator."""
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.current_accelerator() is not None:
        kind = accelerator.current_accelerator().type
        return torch.device(kind, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def job_collective() -> Optional[Collective]:
    """The job's process group when `torch.distributed` is initialised with more than one rank.

    Looked up at each call, not once: trainers initialise the process group after importing and
    configuring everything else (the Trainer's setup, the Lightning strategy, `init_process_group`
    in the user's script).
    """
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return TorchDistributed()
