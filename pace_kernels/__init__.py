"""Fused PACE linear ops: frozen ``W0 x + b0`` plus a noise-scaled adapter path, in one pass.

``lora_add_linear`` and ``lora_mul_linear`` dispatch between the Triton kernels and the pure-PyTorch
reference (:mod:`pace_kernels.reference`, the executable spec); see :mod:`pace_kernels.dispatch`.
"""

from . import reference
from .checks import BACKENDS, LinearShapes, check_backend, check_linear_inputs
from .dispatch import lora_add_linear, lora_mul_linear
from .reference import expand_noise

__all__ = [
    "lora_add_linear",
    "lora_mul_linear",
    "reference",
    "expand_noise",
    "check_backend",
    "check_linear_inputs",
    "LinearShapes",
    "BACKENDS",
]
