"""The PACE paper's diagnostics (Fig. 2-4), measured as the paper measures them: on held-out data.

The paper's gradient norm is "evaluated on validation set" (docs/design.md section 5): the
norm of the gradient of the classification loss on held-out samples with respect to the trainable
tensors, with the model as trained and no noise. It is *not* the training objective's gradient norm,
which for a model fitted to a few shots is small by construction and says nothing about flatness.

Batches are combined as one loss: the gradient of the mean cross-entropy over *all* held-out
samples (the per-batch sums of gradients, divided by the total sample count), so the value does not
depend on how the held-out set is cut into batches. The FP-distance (paper Eq. 5) is the mean over
the same samples of ``sum_c (f(x) - f_pretrained(x))^2``.

Nothing the caller relies on changes: ``.grad`` fields are untouched (``torch.autograd.grad``),
every module's train/eval flag is restored, and the random streams (CPU and the model's CUDA
devices) are as they were, even if iterating ``batches`` draws random numbers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inject import adapters_disabled

__all__ = ["HeldoutDiagnostics", "heldout_diagnostics", "heldout_grad_norm", "heldout_fp_distance"]

IGNORE_INDEX = -100  # labels of unscored positions (token-level outputs), as in F.cross_entropy


@dataclass(frozen=True)
class HeldoutDiagnostics:
    """What :func:`heldout_diagnostics` measures on a held-out set (eval mode, no noise).

    ``grad_norm``: L2 norm of the gradient of ``loss`` w.r.t. the trainable tensors;
    ``loss``: mean cross-entropy over the labelled samples; ``fp_distance``: mean of
    ``sum_c (f - f_pretrained)^2`` (NaN when not asked for); ``accuracy``: top-1;
    ``samples``: how many labelled samples (or token positions) were scored.
    """

    grad_norm: float
    loss: float
    fp_distance: float
    accuracy: float
    samples: int


def _unwrap(model: nn.Module) -> nn.Module:
    # A DistributedDataParallel wrapper expects every forward to be followed by its backward;
    # the diagnostics run the wrapped module directly.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _split_batch(batch: Any, position: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x, y
    raise TypeError(
        "batches must yield (inputs, labels, ...) tuples of tensors, as a DataLoader over the trainer's "
        f"datasets does; item {position} is {type(batch).__name__}"
    )


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)  # transformers' model outputs carry .logits
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return a logits tensor, got {type(output).__name__}")
    return logits


def _flat_labelled(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[..., C]`` and labels ``[...]`` as ``[n, C]`` and ``[n]`` for the scored positions."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels of shape {list(labels.shape)} do not match logits of shape {list(logits.shape)} "
            "(expected logits [..., classes] and labels [...])"
        )
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    scored = labels != IGNORE_INDEX
    return logits[scored], labels[scored]


def _check_params(model: nn.Module, params: Optional[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable tensors (no parameter requires grad)")
        return params
    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError("params must be a non-empty sequence of tensors that require grad")
    return params


@contextlib.contextmanager
def _eval_without_side_effects(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Eval mode (noise, DropPath and dropout off) inside; every module's flag and the random
    streams restored after."""
    flags = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        model.eval()
        try:
            yield
        finally:
            for m, was_training in flags:
                m.training = was_training


def heldout_diagnostics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    params: Optional[Sequence[torch.Tensor]] = None,
    fp_distance: bool = True,
    all_reduce: bool = False,
) -> HeldoutDiagnostics:
    """The held-out gradient norm, loss, accuracy and (optionally) FP-distance in one pass.

    ``batches`` yields ``(x, y, ...)``: logits ``[B, C]`` with labels ``[B]``, or token-level logits
    ``[B, T, C]`` with labels ``[B, T]`` aligned to them (shift a causal LM's labels first), positions
    labelled ``-100`` not scored. ``params`` defaults to the model's trainable tensors. Inputs are
    moved to the device of the first of them. The gradient is that of the mean cross-entropy over
    all scored samples, not a mean of per-batch norms. Costs one forward and backward per batch
    (plus one forward with the adapters off for the FP-distance). ``all_reduce=True``: each process
    of the initialised default ``torch.distributed`` group passes its share of the held-out set, and
    the sums are combined over the group before dividing, so every rank gets the whole set's values.
    """
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = _check_params(model, params)
    device = params[0].device
    grad_sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    fp_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    with _eval_without_side_effects(model, params), torch.enable_grad():
        for position, batch in enumerate(batches):
            x, y = _split_batch(batch, position)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, labels = _flat_labelled(_logits(model(x)), y)
            if labels.numel() == 0:
                continue
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, g in zip(grad_sums, grads):
                if g is not None:
                    total.add_(g.float())
            loss_sum += loss.detach().double()
            correct += (logits.detach().argmax(-1) == labels).sum()
            count += labels.numel()
            if fp_distance:
                with torch.no_grad(), adapters_disabled(model):
                    pretrained, _ = _flat_labelled(_logits(model(x)), y)
                fp_sum += (logits.detach().float() - pretrained.float()).square().sum().double()
    if all_reduce:
        grad_sums, loss_sum, fp_sum, correct, count = _sum_over_processes(
            grad_sums, loss_sum, fp_sum, correct, count
        )
    if count == 0:
        raise ValueError("batches held no labelled sample: nothing to measure")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad_sums])) / count
    return HeldoutDiagnostics(
        grad_norm=float(norm),
        loss=float(loss_sum) / count,
        fp_distance=float(fp_sum) / count if fp_distance else math.nan,
        accuracy=int(correct) / count,
        samples=count,
    )


def _sum_over_processes(grad_sums, loss_sum, fp_sum, correct, count):
    """One collective for every sum (gradients flattened, then the scalars in float64)."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise ValueError("all_reduce=True needs an initialised torch.distributed process group")
    flat = torch.cat([g.reshape(-1).double() for g in grad_sums])
    scalars = torch.stack([loss_sum, fp_sum, correct.double(), loss_sum.new_tensor(float(count))])
    packed = torch.cat([flat, scalars])
    torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM)
    summed, offset = [], 0
    for g in grad_sums:
        summed.append(packed[offset : offset + g.numel()].view_as(g).float())
        offset += g.numel()
    loss_sum, fp_sum, correct, count = packed[offset:]
    return summed, loss_sum, fp_sum, correct.long(), int(count)


def heldout_grad_norm(
    model: nn.Module, batches: Iterable[Any], *, params: Optional[Sequence[torch.Tensor]] = None
) -> float:
    """``|| d/dθ mean_i CE(f(x_i), y_i) ||_2`` over every held-out sample of ``batches``, θ the
    trainable tensors (or ``params``), in eval mode without noise: the gradient norm the PACE paper
    plots (Fig. 2a, 3a, 4). See :func:`heldout_diagnostics` for the batch format."""
    return heldout_diagnostics(model, batches, params=params, fp_distance=False).grad_norm


def heldout_fp_distance(model: nn.Module, batches: Iterable[Any]) -> float:
    """The FP-distance (paper Eq. 5, Fig. 2b) over every held-out sample of ``batches``: the mean of
    ``sum_c (f(x) - f_pretrained(x))^2`` in eval mode, ``f_pretrained`` the model with every adapter
    off and the head kept. Unlike :func:`pace.fp_distance` (one batch, the model's current mode),
    it averages over all samples and always measures without noise."""
    model = _unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad][:1] or list(model.parameters())[:1]
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with _eval_without_side_effects(model, params), torch.no_grad():
        for position, batch in enumerate(batches):
            x, y = _split_batch(batch, position)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            f, _ = _flat_labelled(_logits(model(x)), y)
            with adapters_disabled(model):
                f0, _ = _flat_labelled(_logits(model(x)), y)
            total += (f.float() - f0.float()).square().sum().double()
            count += f.shape[0]
    if count == 0:
        raise ValueError("batches held no labelled sample: nothing to measure")
    return float(total) / count
