"""Backend dispatch for the fused linear ops.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the reference on anything else;
``"triton"`` forces the kernels (on CPU tensors they run in Triton's interpreter, which is how the
tests exercise them without a GPU); ``"torch"`` forces the reference.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import reference
from ._checks import check_backend, check_linear_inputs


def _triton_impl(op: str) -> Callable:
    # Plain import statements, not importlib: torch.compile traces these (the module is imported at
    # trace time if need be), while importlib.import_module is a graph break.
    try:
        if op == "lora_add_linear":
            from .lora_add import lora_add_linear_triton as fn
        elif op == "lora_mul_linear":
            from .lora_mul import lora_mul_linear_triton as fn
        else:
            raise KeyError(f"no Triton implementation registered for {op}")
    except ImportError as exc:  # triton missing, or the kernel module not built for this platform
        raise NotImplementedError(f"{op}: backend='triton' is unavailable here ({exc})") from exc
    return fn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type not in ("cuda", "cpu"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t: object, dtype: torch.dtype) -> object:
    # Anything but a float tensor is left for check_linear_inputs to name in its error.
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _dispatch(op: str, backend: str, x, weight, bias, lora_a, lora_b, delta_bias, noise) -> torch.Tensor:
    check_backend(backend)
    use_triton = backend == "triton" or (backend == "auto" and isinstance(x, torch.Tensor) and x.is_cuda)
    autocast = False
    if isinstance(x, torch.Tensor):
        amp_dtype = _autocast_dtype(x.device.type)
        autocast = amp_dtype is not None and x.is_floating_point()
        if autocast:
            # Under autocast a linear layer computes in the autocast dtype; cast every operand (the
            # noise stays as given) so both backends see one dtype, as F.linear would. The kernels
            # take the frozen weight as it is and cast it per call: a cast here would be a D x K
            # copy that their autograd saves for backward (issue 10, the memory contract).
            x, bias, lora_a, lora_b, delta_bias = (
                _cast(t, amp_dtype) for t in (x, bias, lora_a, lora_b, delta_bias)
            )
            if not use_triton:
                weight = _cast(weight, amp_dtype)
    if not use_triton:
        return getattr(reference, op)(x, weight, bias, lora_a, lora_b, delta_bias, noise)
    check_linear_inputs(op, x, weight, bias, lora_a, lora_b, delta_bias, noise, weight_any_dtype=autocast)
    return _triton_impl(op)(x, weight, bias, lora_a, lora_b, delta_bias, noise, weight_any_dtype=autocast)


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
    return _dispatch("lora_add_linear", backend, x, weight, bias, lora_a, lora_b, delta_bias, noise)


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
    """``Y = x W0^T + b0 + Z * (x (W0 * (B A))^T + db)``; see
    :func:`pace_kernels.reference.lora_mul_linear`."""
    return _dispatch("lora_mul_linear", backend, x, weight, bias, lora_a, lora_b, delta_bias, noise)
