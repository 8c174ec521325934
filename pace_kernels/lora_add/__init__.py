"""Fused ``lora_add`` linear layer: ``Y = X W0^T + b0 + Zr * (U B^T + db)``, ``U = X A^T``.

Kernels in :mod:`.kernels`, config lists in :mod:`.configs`, launches, the ``torch.library`` ops and
their autograd in :mod:`.op`; the design (tiling, noise paths, determinism) is docs/design.md section
9.2. Importing the package registers ``torch.ops.pace.lora_add_fwd`` and ``lora_add_bwd``.
"""

from . import configs, kernels, op
from .configs import DX_CONFIGS_16, DX_CONFIGS_32, FWD_CONFIGS_16, FWD_CONFIGS_32
from .op import MAX_RANK, SEGMENT_MIN_ROWS, check_segment_tile, lora_add_bwd, lora_add_fwd

__all__ = [
    "MAX_RANK",
    "SEGMENT_MIN_ROWS",
    "check_segment_tile",
    "lora_add_fwd",
    "lora_add_bwd",
    "FWD_CONFIGS_16",
    "FWD_CONFIGS_32",
    "DX_CONFIGS_16",
    "DX_CONFIGS_32",
    "configs",
    "kernels",
    "op",
]
