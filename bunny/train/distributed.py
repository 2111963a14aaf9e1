"""Process-group set-up for ``torchrun`` (DDP, DeepSpeed, FSDP2) and the few collectives training uses.

One process (``bunny train``) needs nothing. Under ``torchrun --nproc_per_node N bunny ...`` the
environment carries RANK / WORLD_SIZE / LOCAL_RANK; we initialise NCCL on GPUs and gloo on CPU
(which is how the multi-process tests run on a laptop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False
    """Whether setup() created the process group (then teardown() destroys it; a caller's is left alone)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce_sum(self, value: float | int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=self._comm_device()).clone()
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_object(self, obj):
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str | None = None, need_group: bool = False) -> DistInfo:
    """Initialise the process group when launched by torchrun; pick this process's device.

    ``need_group``: DeepSpeed and FSDP need a process group even for one process; one is made on
    the spot (local TCP store) when the launcher did not set one up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = None
    owns = False
    if need_group and world == 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        world = 2  # fall through to the initialisation below (with world_size 1)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
        owns = True
    elif dist.is_initialized():
        backend = dist.get_backend()
    world = dist.get_world_size() if dist.is_initialized() else 1
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend, owns_group=owns)


def teardown(info: DistInfo, barrier: bool = True) -> None:
    """Destroy the group setup() made (after a barrier, unless a process failed: it would never come)."""
    if info.owns_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
