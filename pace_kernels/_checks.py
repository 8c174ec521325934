"""Old private name of :mod:`pace_kernels.checks`, kept until ``pace`` imports the public one."""

from .checks import LinearShapes, check_backend, check_linear_inputs

__all__ = ["LinearShapes", "check_backend", "check_linear_inputs"]
