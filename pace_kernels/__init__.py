"""Fused PACE linear ops: frozen ``W0 x + b0`` plus a noise-scaled adapter path, in one pass.

``lora_add_linear`` and ``lora_mul_linear`` dispatch between the Triton kernels and the pure-PyTorch
reference (:mod:`pace_kernels.reference`, the executable spec); see :mod:`pace_kernels.dispatch`.
``check_backend`` and ``expand_noise`` are public for callers that pick a backend or place the noise
outside the fused ops themselves (:mod:`pace`).
"""

from . import reference
from ._checks import LinearShapes, check_backend, check_linear_inputs
from .dispatch import lora_add_linear, lora_mul_linear
from .reference import expand_noise

__all__ = [
    "lora_add_linear",
    "lora_mul_linear",
    "reference",
    "check_linear_inputs",
    "check_backend",
    "expand_noise",
    "LinearShapes",
]
