"""Data-parallel training under ``torchrun`` (why by hand, not DDP: docs/design.md section 11)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """Rank and world size as ``torchrun`` sets them (a plain run is rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(env: DistEnv, device: torch.device) -> Optional[str]:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns its backend, None when running alone."""
    if not env.enabled:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return backend


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], env: DistEnv) -> None:
    """Make every rank start from rank 0's values (they are equal already when seeded alike)."""
    if env.enabled:
        for p in params:
            dist.broadcast(p.data, src=0)  # .data: written in place, outside autograd


def average_gradients(params: Sequence[torch.nn.Parameter], env: DistEnv) -> None:
    """All-reduce the mean gradient over ranks in one collective (a missing gradient counts as 0)."""
    if not env.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    for p, g, chunk in zip(params, grads, flat.split([g.numel() for g in grads])):
        p.grad = g.copy_(chunk.view_as(g))  # back in the gradient's own dtype


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``values`` summed over ranks (one collective; the tensor itself when running alone)."""
    if not env.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_rows(
    index: torch.Tensor, logits: torch.Tensor, env: DistEnv
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(index, logits)`` of this step in rank order (the sampler makes the shapes equal)."""
    if not env.enabled:
        return index, logits
    gathered = []
    for t in (index.contiguous(), logits.detach().float().contiguous()):
        parts = [torch.empty_like(t) for _ in range(env.world_size)]
        dist.all_gather(parts, t)
        gathered.append(torch.cat(parts))
    return gathered[0], gathered[1]


def all_gather_object(obj: Any, env: DistEnv) -> List[Any]:
    if not env.enabled:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
