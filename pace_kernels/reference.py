"""The reference path: docs/design.md section 3 in plain PyTorch, autograd through ordinary ops.

This module is the executable specification every kernel is tested against, and the path that
runs on CPU. It favours clarity over speed: the adapter weight of ``lora_mul`` is materialised and
the noise is an ordinary elementwise multiply, exactly the costs the fused kernels remove.

The frozen ``weight``/``bias`` and the ``noise`` are detached: docs/design.md (section 3) says they
never receive gradients, and the kernels do not produce any for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_linear_inputs

__all__ = ["lora_add_linear", "lora_mul_linear", "expand_noise"]


def expand_noise(noise: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Reshape a per-sample ``[x.shape[0], D]`` or per-token ``[*x.shape[:-1], D]`` noise so it
    broadcasts against an output of shape ``[*x.shape[:-1], D]`` (tokens of a sample share a row)."""
    if noise is None:
        return None
    noise = noise.detach().to(dtype)
    if noise.ndim == 2 and x.ndim > 2:
        noise = noise.view(noise.shape[0], *([1] * (x.ndim - 2)), noise.shape[1])
    return noise


def lora_add_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = x W0^T + b0 + Z * ((x A^T) B^T + db)`` (docs/design.md section 3, ``lora_add``)."""
    check_linear_inputs("lora_add_linear", x, weight, bias, lora_a, lora_b, delta_bias, noise)
    return lora_add_formula(x, weight, bias, lora_a, lora_b, delta_bias, noise)


def lora_add_formula(x, weight, bias, lora_a, lora_b, delta_bias, noise) -> torch.Tensor:
    """:func:`lora_add_linear` on inputs already validated (the dispatcher checks once)."""
    base = F.linear(x, weight.detach(), None if bias is None else bias.detach())
    delta = F.linear(F.linear(x, lora_a), lora_b, delta_bias)
    z = expand_noise(noise, x, delta.dtype)
    return base + (delta if z is None else delta * z)


def lora_mul_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = x W0^T + b0 + Z * (x (W0 * (B A))^T + db)`` (docs/design.md section 3, ``lora_mul``)."""
    check_linear_inputs("lora_mul_linear", x, weight, bias, lora_a, lora_b, delta_bias, noise)
    return lora_mul_formula(x, weight, bias, lora_a, lora_b, delta_bias, noise)


def lora_mul_formula(x, weight, bias, lora_a, lora_b, delta_bias, noise) -> torch.Tensor:
    """:func:`lora_mul_linear` on inputs already validated (the dispatcher checks once)."""
    w0 = weight.detach()
    base = F.linear(x, w0, None if bias is None else bias.detach())
    delta = F.linear(x, w0 * (lora_b @ lora_a), delta_bias)
    z = expand_noise(noise, x, delta.dtype)
    return base + (delta if z is None else delta * z)
