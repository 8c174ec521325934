"""Input validation of the fused linear ops, the same for every backend.

:mod:`pace_kernels.dispatch` calls :func:`check_linear_inputs` once per call, before it chooses a
backend, and the public reference functions call it too, so a bad argument raises the same
``ValueError``/``TypeError`` whichever backend runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LinearShapes:
    """Sizes of one fused linear call after flattening ``x`` to ``[N, K]``.

    ``rows_per_noise`` is how many consecutive rows share one noise row: ``T`` (tokens per sample)
    for per-sample noise, 1 for per-token noise, 0 when there is no noise.
    """

    n_rows: int
    in_features: int
    out_features: int
    rank: int
    rows_per_noise: int


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t: object, *, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}"
        )


def check_linear_inputs(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    delta_bias: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    *,
    weight_any_dtype: bool = False,
) -> LinearShapes:
    """Validate the arguments of ``lora_add_linear`` / ``lora_mul_linear`` (docs/design.md section 3).

    ``x [..., K]``, ``weight [D, K]``, ``bias [D] | None``, ``lora_a [r, K]``, ``lora_b [D, r]``,
    ``delta_bias [D] | None``, ``noise [x.shape[0], D]`` (per sample) or ``[*x.shape[:-1], D]`` (per
    token) or ``None``. All but ``noise`` share one dtype and every tensor one device;
    ``weight_any_dtype`` exempts the frozen weight from the dtype rule (under autocast the kernels
    take the fp32 master weight and read it cast to ``x``'s dtype).
    """
    for name, t, optional in (
        ("x", x, False),
        ("weight", weight, False),
        ("bias", bias, True),
        ("lora_a", lora_a, False),
        ("lora_b", lora_b, False),
        ("delta_bias", delta_bias, True),
        ("noise", noise, True),
    ):
        _check_tensor(f"{op}: {name}", t, optional=optional)

    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got shape {_shape(weight)}")
    d_out, k_in = weight.shape
    if x.ndim < 1 or x.shape[-1] != k_in:
        raise ValueError(
            f"{op}: x must have shape [..., {k_in}] (last dim = weight.shape[1]), got {_shape(x)}"
        )
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"{op}: bias must have shape [{d_out}], got {_shape(bias)}")
    if lora_a.ndim != 2 or lora_a.shape[1] != k_in or lora_a.shape[0] < 1:
        raise ValueError(f"{op}: lora_a must have shape [rank, {k_in}] with rank >= 1, got {_shape(lora_a)}")
    rank = lora_a.shape[0]
    if tuple(lora_b.shape) != (d_out, rank):
        raise ValueError(
            f"{op}: lora_b must have shape [{d_out}, {rank}] ([out_features, rank]), got {_shape(lora_b)}"
        )
    if delta_bias is not None and tuple(delta_bias.shape) != (d_out,):
        raise ValueError(f"{op}: delta_bias must have shape [{d_out}], got {_shape(delta_bias)}")

    for name, t in (
        ("weight", None if weight_any_dtype else weight),
        ("bias", bias),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("delta_bias", delta_bias),
    ):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("delta_bias", delta_bias),
        ("noise", noise),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but x is on {x.device}; they must be on one device"
            )

    n_rows = math.prod(x.shape[:-1])  # not x.numel() // K: K may be 0
    rows_per_noise = 0
    if noise is not None:
        if x.ndim < 2:
            raise ValueError(
                f"{op}: noise needs x with a leading sample dimension, got x of shape {_shape(x)}"
            )
        per_sample = (x.shape[0], d_out)
        per_token = (*x.shape[:-1], d_out)
        if tuple(noise.shape) == per_sample:
            rows_per_noise = n_rows // x.shape[0] if x.shape[0] > 0 else 1
        elif tuple(noise.shape) == per_token:
            rows_per_noise = 1
        else:
            raise ValueError(
                f"{op}: noise must have shape [{', '.join(map(str, per_sample))}] (per sample) or "
                f"[{', '.join(map(str, per_token))}] (per token), got {_shape(noise)}"
            )
    return LinearShapes(n_rows, k_in, d_out, rank, rows_per_noise)


BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> None:
    """Raise a ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
