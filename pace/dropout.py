"""Stochastic layers that share one mask per sample across the copies of a multi-copy batch.

PACE's consistency loss compares copies of the same sample that differ only by the adapter noise
(SPEC section 4): DropPath and dropout must draw one mask per sample and reuse it for every copy.
In a batch of ``M*B`` rows, copy ``c`` of sample ``b`` sits at row ``c*B + b``.

Not covered: attention dropout that timm's fused attention passes to
``scaled_dot_product_attention`` as ``dropout_p`` (0 by default) never calls its ``nn.Dropout``
module, so it cannot be shared; inject leaves it as it is.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["SharedDropPath", "SharedDropout", "set_copies", "reused_masks"]


class _SharedMaskLayer(nn.Module):
    """Draws a per-sample mask for one copy and tiles it over ``pace_copies`` copies; inside
    :func:`reused_masks` the first mask drawn is kept and handed out again."""

    def __init__(self) -> None:
        super().__init__()
        self.pace_copies = 1
        self._mask_memo: Optional[dict] = None

    def _mask(self, x: torch.Tensor, tail_shape, keep: float) -> torch.Tensor:
        memo = self._mask_memo
        if memo is not None and "mask" in memo and memo["mask"].shape[0] == x.shape[0]:
            return memo["mask"]
        rows, copies = x.shape[0], self.pace_copies
        if copies > 1 and rows % copies != 0:
            raise ValueError(f"batch of {rows} rows is not {copies} copies of one batch (see set_copies)")
        per_copy = rows // copies
        mask = torch.empty((per_copy, *tail_shape), device=x.device, dtype=x.dtype).bernoulli_(keep)
        mask = self._scale(mask, keep).repeat(copies, *([1] * len(tail_shape)))
        if memo is not None:
            memo["mask"] = mask
        return mask

    def _scale(self, mask: torch.Tensor, keep: float) -> torch.Tensor:
        return mask / keep if keep > 0 else mask


class SharedDropPath(_SharedMaskLayer):
    """Stochastic depth (one keep/drop decision per sample) whose mask is shared by the copies.

    ``mean_normalize=True`` (the default, as the public PACE code does) divides the mask by its
    batch mean, so the kept residual branches always average to 1; ``False`` keeps timm's
    ``1 / keep_prob`` scaling only.
    """

    def __init__(
        self, drop_prob: float = 0.0, scale_by_keep: bool = True, mean_normalize: bool = True
    ) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.mean_normalize = mean_normalize

    def _scale(self, mask: torch.Tensor, keep: float) -> torch.Tensor:
        if self.scale_by_keep and keep > 0.0:
            mask = mask / keep
        if self.mean_normalize:
            mask = mask / (mask.mean() + 1e-12)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self._mask(x, (1,) * (x.ndim - 1), 1.0 - self.drop_prob)

    def extra_repr(self) -> str:
        return (
            f"drop_prob={self.drop_prob:.3f}, mean_normalize={self.mean_normalize}, copies={self.pace_copies}"
        )


class SharedDropout(_SharedMaskLayer):
    """Dropout whose element mask is drawn for one copy and reused for the others."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self._mask(x, x.shape[1:], 1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, copies={self.pace_copies}"


def set_copies(model: nn.Module, copies: int) -> None:
    """Tell every shared stochastic layer (any module with a ``pace_copies`` attribute, so a layer
    of your own can take part) that the next batches hold ``copies`` copies of each sample."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    for m in model.modules():
        if hasattr(m, "pace_copies"):
            m.pace_copies = copies


@contextlib.contextmanager
def reused_masks(model: nn.Module) -> Iterator[nn.Module]:
    """Every pass over a batch inside this block sees the DropPath/dropout masks of the first pass,
    so two passes differ only by what else changed between them (FPA's pre-trained pass)."""
    layers = [m for m in model.modules() if isinstance(m, _SharedMaskLayer)]
    for m in layers:
        m._mask_memo = {}
    try:
        yield model
    finally:
        for m in layers:
            m._mask_memo = None
