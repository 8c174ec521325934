"""PACE's perturbation noise (docs/design.md section 4) and the paper's ablation noises.

Multiplicative noises (``"gaussian"``, ``"dropout"``) have mean 1 and standard deviation ``sigma``,
so the fused kernels take them as the ``noise`` tensor. ``"additive"`` noise has mean 0 and is added
to the adapter output instead.
"""

from __future__ import annotations

from typing import Sequence

import torch

NOISE_KINDS = ("gaussian", "dropout", "additive")


def check_noise_kind(noise: str) -> None:
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")


def draw_noise(kind: str, sigma: float, shape: Sequence[int], *, device, dtype=torch.float32) -> torch.Tensor:
    """Draw one noise tensor of ``shape``.

    - ``gaussian``: ``z ~ N(1, sigma^2)``, the PACE noise.
    - ``dropout``: ``z = m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` and ``p = sigma^2 / (1 + sigma^2)``,
      chosen so that ``z`` has the same mean (1) and variance (``sigma^2``) as the Gaussian noise and
      the two ablations are compared at equal strength.
    - ``additive``: ``e ~ N(0, sigma^2)``, added to (not multiplied with) the adapter output.
    """
    check_noise_kind(kind)
    if kind == "gaussian":
        return torch.randn(*shape, device=device, dtype=dtype).mul_(sigma).add_(1.0)
    if kind == "dropout":
        p = sigma * sigma / (1.0 + sigma * sigma)
        keep = torch.rand(*shape, device=device, dtype=dtype) >= p
        return keep.to(dtype) / (1.0 - p)
    return torch.randn(*shape, device=device, dtype=dtype).mul_(sigma)
