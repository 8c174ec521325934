"""Data-parallel training under ``torchrun`` (NCCL on GPUs, gloo on CPU).

Every rank holds the whole model. After each backward the gradients of the trainable tensors (the
adapters and the head: small) are averaged across ranks with one all-reduce of their concatenation,
which is what ``DistributedDataParallel`` computes; doing it by hand keeps the PACE criterion free
to run the model any number of times per step (two copies, lazy half batches, FPA's reference pass).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

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


def init(env: DistEnv, device: torch.device) -> None:
    if not env.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], env: DistEnv) -> None:
    """Make every rank start from rank 0's values (they are equal already when seeded alike)."""
    if not env.enabled:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: Sequence[torch.nn.Parameter], env: DistEnv) -> None:
    """All-reduce the mean gradient over ranks in one collective (a missing gradient counts as 0)."""
    if not env.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        chunk = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
        if p.grad is None:
            p.grad = chunk
        else:
            p.grad.copy_(chunk)


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
    """Every rank's ``(index, logits)`` of this step, concatenated in rank order.

    The batch sampler gives every rank the same number of samples per step, so plain
    ``all_gather`` of equal shapes suffices.
    """
    if not env.enabled:
        return index, logits
    idx = index.contiguous()
    val = logits.detach().float().contiguous()
    idx_all = [torch.empty_like(idx) for _ in range(env.world_size)]
    val_all = [torch.empty_like(val) for _ in range(env.world_size)]
    dist.all_gather(idx_all, idx)
    dist.all_gather(val_all, val)
    return torch.cat(idx_all), torch.cat(val_all)


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
