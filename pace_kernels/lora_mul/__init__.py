"""Fused ``lora_mul`` linear layer (and RLRR, its rank-1 case) with PACE noise:
``Y = X W0^T + b0 + Zr * (X (W0*M)^T + db)``, ``M = B A``.

Kernels in :mod:`.kernels`, config lists in :mod:`.configs`, the row plan, launches, the
``torch.library`` ops and their autograd in :mod:`.op`. The design (per-sample weights built tile by
tile, the row plan and its counts, dM, the drafts measured) is docs/design.md section 9.3.
Importing the package registers ``torch.ops.pace.lora_mul_fwd`` and ``lora_mul_bwd``.
"""

from . import configs, kernels, op
from .configs import (
    DM_CONFIGS_16,
    DM_CONFIGS_32,
    PLAIN_CONFIGS_16,
    PLAIN_CONFIGS_32,
    SAMPLE_CONFIGS_16,
    SAMPLE_CONFIGS_32,
    TWO_GEMM_DX_CONFIGS_16,
    TWO_GEMM_DX_CONFIGS_32,
    TWO_GEMM_FWD_CONFIGS_16,
    TWO_GEMM_FWD_CONFIGS_32,
)
from .op import MAX_RANK, SAMPLE_BLOCK_MS, SamplePlan, dm_splits, lora_mul_bwd, lora_mul_fwd, sample_plan

__all__ = [
    "MAX_RANK",
    "SAMPLE_BLOCK_MS",
    "SamplePlan",
    "sample_plan",
    "dm_splits",
    "lora_mul_fwd",
    "lora_mul_bwd",
    "PLAIN_CONFIGS_16",
    "PLAIN_CONFIGS_32",
    "SAMPLE_CONFIGS_16",
    "SAMPLE_CONFIGS_32",
    "TWO_GEMM_FWD_CONFIGS_16",
    "TWO_GEMM_FWD_CONFIGS_32",
    "TWO_GEMM_DX_CONFIGS_16",
    "TWO_GEMM_DX_CONFIGS_32",
    "DM_CONFIGS_16",
    "DM_CONFIGS_32",
    "configs",
    "kernels",
    "op",
]
