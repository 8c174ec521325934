"""The one path from a public op to a kernel launch: validate once, choose the backend once, launch.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the reference on anything else;
``"triton"`` forces the kernels (on CPU tensors they run in Triton's interpreter, which is how the
tests exercise them without a GPU); ``"torch"`` forces the reference. Inputs the kernels do not take
(float64, a rank above the op's ``MAX_RANK``) run the reference whatever the backend. Everything that
decides between the two is in :func:`_run`; below it there is only the registered op
(``torch.ops.pace.*_fwd``, its autograd registered beside it) and the kernels.
"""

from __future__ import annotations

import math

import torch

from . import reference
from .checks import check_backend, check_linear_inputs

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Operand dtypes the kernels take (float64 inputs go to the reference)."""


def _kernel_max_rank(op: str) -> int:
    """Import the op's kernel module (which registers ``torch.ops.pace.*``) and return the largest
    rank its kernels take."""
    # Plain import statements, not importlib: torch.compile traces these (the module is imported at
    # trace time if need be), while importlib.import_module is a graph break.
    try:
        if op == "lora_add_linear":
            from .lora_add import MAX_RANK
        else:
            from .lora_mul import MAX_RANK
    except ImportError as exc:  # triton missing, or the kernel module not built for this platform
        raise NotImplementedError(f"{op}: backend='triton' is unavailable here ({exc})") from exc
    return MAX_RANK


def _autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype a linear layer computes in under autocast, or None (no autocast, not a float tensor)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.device.type not in ("cuda", "cpu"):
        return None
    if not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def _cast(t: object, dtype: torch.dtype) -> object:
    # Anything but a float tensor is left for check_linear_inputs to name in its error.
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _run(op: str, backend: str, x, weight, bias, lora_a, lora_b, delta_bias, noise) -> torch.Tensor:
    check_backend(backend)
    amp_dtype = _autocast_dtype(x)
    if amp_dtype is not None:
        # Under autocast a linear layer computes in the autocast dtype; cast every operand but the
        # frozen weight and the noise, so both backends see one dtype, as F.linear would. The kernels
        # take the frozen weight as it is and cast it per call: a cast here would be a D x K copy that
        # their autograd saves for backward (issue 10, the memory contract).
        x, bias, lora_a, lora_b, delta_bias = (
            _cast(t, amp_dtype) for t in (x, bias, lora_a, lora_b, delta_bias)
        )
    shapes = check_linear_inputs(op, x, weight, bias, lora_a, lora_b, delta_bias, noise,
                                 weight_any_dtype=amp_dtype is not None)
    use_kernels = backend == "triton" or (backend == "auto" and x.is_cuda)
    if use_kernels:
        max_rank = _kernel_max_rank(op)
        use_kernels = x.dtype in KERNEL_DTYPES and shapes.rank <= max_rank
    if not use_kernels:
        formula = reference.lora_add_formula if op == "lora_add_linear" else reference.lora_mul_formula
        return formula(x, weight.to(x.dtype), bias, lora_a, lora_b, delta_bias, noise)

    d_out, k_in = shapes.out_features, shapes.in_features
    # The ops take x as [N, K] and the noise as [N / rows_per_noise, D], with explicit row counts (a
    # reshape cannot infer -1 when K or D is 0); the frozen weight, bias and noise get no gradients.
    args = (
        x.reshape(shapes.n_rows, k_in).contiguous(),
        weight.detach(),
        None if bias is None else bias.detach(),
        lora_a,
        lora_b,
        delta_bias,
        None if noise is None else noise.detach().reshape(math.prod(noise.shape[:-1]), d_out),
        shapes.rows_per_noise,
    )
    if op == "lora_add_linear":
        y2d, _ = torch.ops.pace.lora_add_fwd(*args)  # U = x A^T is for backward only
    else:
        y2d = torch.ops.pace.lora_mul_fwd(*args)
    return y2d.view(*x.shape[:-1], d_out)


def lora_add_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``Y = x W0^T + b0 + Z * ((x A^T) B^T + db)``; see :func:`pace_kernels.reference.lora_add_linear`."""
    return _run("lora_add_linear", backend, x, weight, bias, lora_a, lora_b, delta_bias, noise)


def lora_mul_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``Y = x W0^T + b0 + Z * (x (W0 * (B A))^T + db)``; see :func:`pace_kernels.reference.lora_mul_linear`.
    RLRR is the rank-1 case (``lora_b = s_left [D, 1]``, ``lora_a = s_right^T [1, K]``,
    ``delta_bias = shift``)."""
    return _run("lora_mul_linear", backend, x, weight, bias, lora_a, lora_b, delta_bias, noise)
