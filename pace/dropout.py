"""Stochastic layers that share one mask per sample across the copies of a multi-copy batch.

PACE's consistency loss compares copies of the same sample that differ only by the adapter noise
(SPEC section 4): DropPath and dropout must draw one mask per sample and reuse it for every copy.
In a batch of ``M*B`` rows, copy ``c`` of sample ``b`` sits at row ``c*B + b``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SharedDropPath", "SharedDropout", "set_copies"]


def _shared_mask(x: torch.Tensor, mask_shape_tail, keep: float, copies: int) -> torch.Tensor:
    rows = x.shape[0]
    if copies > 1 and rows % copies != 0:
        raise ValueError(f"batch of {rows} rows is not {copies} copies of one batch (set_copies mismatch)")
    per_copy = rows // copies if copies > 1 else rows
    mask = torch.empty((per_copy, *mask_shape_tail), device=x.device, dtype=x.dtype).bernoulli_(keep)
    return mask.repeat(copies, *([1] * len(mask_shape_tail))) if copies > 1 else mask


class SharedDropPath(nn.Module):
    """Stochastic depth (one keep/drop decision per sample) whose mask is shared by the copies."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.pace_copies = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = _shared_mask(x, (1,) * (x.ndim - 1), keep, self.pace_copies)
        if self.scale_by_keep and keep > 0.0:
            mask = mask / keep
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}, copies={self.pace_copies}"


class SharedDropout(nn.Dropout):
    """``nn.Dropout`` whose element mask is drawn for one copy and reused for the others."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.pace_copies = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = _shared_mask(x, x.shape[1:], keep, self.pace_copies)
        return x * mask / keep if keep > 0 else x * 0


def set_copies(model: nn.Module, copies: int) -> None:
    """Tell every shared stochastic layer that the next batches hold ``copies`` copies of each sample."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    for m in model.modules():
        if hasattr(m, "pace_copies"):
            m.pace_copies = copies
