"""Config lists of the ``lora_mul`` kernels, per GPU class (docs/design.md section 9.1)."""

from __future__ import annotations

import triton

# Configs, per GPU class (``autotune_for_device``): 90 Hopper (227 KiB of shared memory per block,
# wgmma), 80 A100 (163 KiB), 86 the 99 KiB parts (sm_86/sm_89: RTX 30xx/40xx, A10, L4, L40S).
# Every entry compiles for its archs with tensor cores, no spills and within the shared memory at
# rank <= 64 (``python -m pace_kernels.compile_check --arch N``); the first of each list is what
# runs with autotuning off. The kernels share the names BLOCK_M/N/K but not their roles: each
# table says what they mean for the kernels it serves. The interpreter runs one small config
# instead (autotuning there would run every config, slowly).


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# sm_8x lists (mma.sync; 99 KiB on sm_86/89) serve A100 (sm_80) too: chosen for its register file,
# they fit its 163 KiB; larger A100 tiles are a tuning question for when one can be benchmarked.
# fp32 on sm_8x: tf32x3 holds its split operands in registers, so BLOCK_K 16 (64x64x32 spills).
_SM8X_32 = [_cfg(64, 64, 16, 8, 3), _cfg(64, 32, 16, 4, 3)]

# Noise-free GEMM against the merged weight, forward and dX. Forward: BLOCK_M rows of X, BLOCK_N
# output features, BLOCK_K the reduction over in features. dX: BLOCK_M rows of G, BLOCK_N in
# features (columns of dX), BLOCK_K the reduction over output features.
_PLAIN_16 = [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
# sm_8x: 128x256x64 spills on sm_86 with Triton 3.6.
_PLAIN_SM8X_16 = [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
PLAIN_CONFIGS_16 = {90: _PLAIN_16, 80: _PLAIN_SM8X_16, 86: _PLAIN_SM8X_16}
PLAIN_CONFIGS_32 = {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32}
# Per-sample tiles, forward and dX, keyed by the tile height sample_plan chose (= BLOCK_M); the
# blocks mean what they mean in the noise-free lists (BLOCK_K: in features in the forward, output
# features in dX). On sm_8x the dX kernel spills at rank 64 with 64x128x64 and 64x256 tiles (and
# on sm_80 with 128x128x32 and 64x64x32 w4), the forward (8 B) with 128x64x64.
_SAMPLE_128_SM8X_16 = [_cfg(128, 64, 32, 8, 4)]
_SAMPLE_64_SM8X_16 = [_cfg(64, 128, 32, 8, 4), _cfg(64, 128, 32, 8, 3)]
SAMPLE_CONFIGS_16 = {
    128: {90: [_cfg(128, 128, 32, 8, 4), _cfg(128, 128, 64, 8, 3)], 80: _SAMPLE_128_SM8X_16,
          86: _SAMPLE_128_SM8X_16},  # 128x128x32 spills 12 B in dX at r64 on sm_86 with Triton 3.6
    64: {90: [_cfg(64, 256, 32, 8, 4), _cfg(64, 128, 32, 4, 4)], 80: _SAMPLE_64_SM8X_16,
         86: _SAMPLE_64_SM8X_16},
}
_SAMPLE_64_SM8X_32 = [_cfg(64, 32, 16, 8, 3), _cfg(64, 16, 16, 4, 3)]
# Triton 3.6 on sm_86 spills with 128x32x16 in three stages and 128x32x32.
_SAMPLE_128_SM8X_32 = [_cfg(128, 32, 16, 8, 2), _cfg(128, 16, 32, 8, 3)]
SAMPLE_CONFIGS_32 = {
    128: {90: [_cfg(128, 64, 16, 8, 3)], 80: _SAMPLE_128_SM8X_32, 86: _SAMPLE_128_SM8X_32},
    # sm_8x: 64x64x16 w8 (dX r64, sm_86) and 64x32x16 w4 (fwd r64, sm_80) spill 8 B with Triton 3.6.
    64: {90: [_cfg(64, 64, 32, 4, 3)], 80: _SAMPLE_64_SM8X_32, 86: _SAMPLE_64_SM8X_32},
}
# Two-GEMM form: two accumulators in the forward (so half the width), one in dX; the blocks as in
# the noise-free lists (BLOCK_N output features forward, in features in dX). The Hopper dX
# configs need 122,880 and 172,032 bytes of shared memory on sm_86: three stages of 32-wide K there
# (64x128x32 with 4 warps spills 12 B on sm_80).
_TWO_GEMM_FWD_16 = [_cfg(128, 64, 64, 8, 3), _cfg(64, 64, 64, 4, 4)]
TWO_GEMM_FWD_CONFIGS_16 = {90: _TWO_GEMM_FWD_16, 80: _TWO_GEMM_FWD_16, 86: _TWO_GEMM_FWD_16}
TWO_GEMM_FWD_CONFIGS_32 = {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32}
_TWO_GEMM_DX_SM8X_16 = [_cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 4)]
TWO_GEMM_DX_CONFIGS_16 = {90: [_cfg(128, 128, 32, 8, 4), _cfg(64, 128, 64, 4, 4)], 80: _TWO_GEMM_DX_SM8X_16,
                          86: _TWO_GEMM_DX_SM8X_16}
TWO_GEMM_DX_CONFIGS_32 = {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32}
# Two-GEMM kernels building W0*M from the factors (FACTORS, the ragged tails): the build's r-wide
# product tile costs registers, so they have lists of their own. Checked at ranks 16 and 64 with
# Triton 3.8 (2026-12-02): every config of the buffer lists spilled on sm_8x (fwd, 16-bit, 60-184 B;
# dX 8-600 B), as did dX 64x128x64 w4 on sm_90 (168 B at r16) and the fp32 64x64x32 ones (tf32x3).
# Rechecked after the kernels took the wrapped-edge convention (2026-12-03): on sm_86/89, dX 64x64x32
# w4 spilled 36 B at r64 (w8 does not) and, with Triton 3.6, fwd fp32 64x64x16 w4 8 B at r64.
_FACTORS_FWD_SM8X_16 = [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 4)]
TWO_GEMM_FACTORS_FWD_CONFIGS_16 = {90: [_cfg(128, 64, 64, 8, 3), _cfg(128, 64, 32, 8, 4)],
                                   80: _FACTORS_FWD_SM8X_16, 86: _FACTORS_FWD_SM8X_16}
_FACTORS_FWD_32 = [_cfg(64, 64, 16, 4, 3), _cfg(64, 32, 16, 4, 3)]
TWO_GEMM_FACTORS_FWD_CONFIGS_32 = {90: _FACTORS_FWD_32, 80: _FACTORS_FWD_32,
                                   86: [_cfg(64, 32, 16, 4, 3), _cfg(32, 64, 16, 4, 3)]}
TWO_GEMM_FACTORS_DX_CONFIGS_16 = {90: [_cfg(128, 128, 32, 8, 4), _cfg(128, 64, 32, 8, 4)],
                                  80: [_cfg(128, 64, 16, 8, 4), _cfg(64, 64, 32, 8, 4)],
                                  86: [_cfg(128, 64, 32, 8, 4), _cfg(64, 64, 32, 8, 4)]}
_FACTORS_DX_SM8X_32 = [_cfg(64, 32, 16, 4, 2), _cfg(32, 64, 16, 4, 3)]
TWO_GEMM_FACTORS_DX_CONFIGS_32 = {90: [_cfg(64, 64, 16, 4, 3), _cfg(64, 32, 16, 4, 3)],
                                  80: _FACTORS_DX_SM8X_32, 86: _FACTORS_DX_SM8X_32}
# dM = (Gz^T X) * W0: BLOCK_M output features (rows of dM), BLOCK_N in features (columns of dM),
# BLOCK_K rows of G and X, the reduction (every BLOCK_K divides 128, the split granule).
# sm_8x: 128x128x32 in four stages needs 102,400 B with Triton 3.6 (sm_86 has 101,376); 64x128x32 w4 s4
# spills 12 B on sm_80 with Triton 3.6; fp32 64x64x32 w4 spills 52 B on sm_86.
_DM_SM8X_16 = [_cfg(128, 128, 32, 8, 3), _cfg(128, 128, 64, 8, 2), _cfg(64, 128, 32, 4, 3)]
DM_CONFIGS_16 = {90: [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(64, 128, 64, 4, 4)],
                 80: _DM_SM8X_16, 86: _DM_SM8X_16}
_DM_32 = [_cfg(64, 64, 32, 4, 3)]
_DM_SM8X_32 = [_cfg(64, 64, 32, 8, 3), _cfg(64, 64, 16, 4, 3)]
DM_CONFIGS_32 = {90: _DM_32, 80: _DM_SM8X_32, 86: _DM_SM8X_32}

_INTERP_CONFIG = _cfg(64, 64, 64, 4, 1)
