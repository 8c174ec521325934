"""Config lists of the ``lora_add`` kernels, per GPU class (docs/design.md section 9.1)."""

from __future__ import annotations

import triton

# Configs, per GPU class (``autotune_for_device``): 90 Hopper (227 KiB of shared memory per
# block, wgmma), 80 A100 (163 KiB), 86 the 99 KiB parts (sm_86/sm_89: RTX 30xx/40xx, A10, L4,
# L40S). Every entry compiles for its archs with tensor cores, no spills and within the shared
# memory at rank <= 64 (``python -m pace_kernels.compile_check --arch N``); the first of each list
# is what runs with autotuning off. The interpreter runs one small config instead.
# Blocks: forward BLOCK_M rows of X, BLOCK_N output features, BLOCK_K the reduction over in
# features; dX BLOCK_M rows of G, BLOCK_K in features (columns of dX), BLOCK_D the reduction over
# output features; rank gradients BLOCK_F features of L (rows of the [F, r] result), BLOCK_N rows
# of L, the reduction.


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int,
         names=("BLOCK_M", "BLOCK_N", "BLOCK_K")) -> triton.Config:
    return triton.Config({names[0]: bm, names[1]: bn, names[2]: bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


_DX_NAMES = ("BLOCK_M", "BLOCK_K", "BLOCK_D")
_RG_NAMES = ("BLOCK_F", "BLOCK_N")


def _rg_cfg(bf: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_F": bf, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _dx_cfg(bm: int, bk: int, bd: int, warps: int, stages: int) -> triton.Config:
    return _cfg(bm, bk, bd, warps, stages, _DX_NAMES)


# 16-bit lists: 128x128 tiles for the large GEMMs, 128x64 / 64x128 for narrow layers and few rows.
# 8 warps for 128-row tiles: at 4 warps they spill (docs/design.md section 7; seen again here). sm_8x lists
# (mma.sync, 99 KiB on sm_86/89) take the Hopper tiles that fit, else halve BLOCK_D or the stages.
# A100 (sm_80) runs the sm_8x lists too: they were chosen for its register file and fit its
# 163 KiB; larger A100 tiles are a tuning question for when one can be benchmarked.
FWD_CONFIGS_16 = {
    90: [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(128, 64, 64, 8, 4),
         _cfg(64, 128, 64, 8, 4)],
}
FWD_CONFIGS_16[80] = FWD_CONFIGS_16[86] = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4),
                                           _cfg(64, 128, 64, 8, 4)]
DX_CONFIGS_16 = {
    90: [_dx_cfg(128, 128, 64, 8, 3), _dx_cfg(128, 128, 32, 8, 4), _dx_cfg(128, 64, 64, 8, 3),
         _dx_cfg(64, 128, 64, 8, 3)],
}
# (128x64x64 in two stages fits too, but spills 32 B at rank 64 on sm_80.)
DX_CONFIGS_16[80] = DX_CONFIGS_16[86] = [_dx_cfg(128, 128, 32, 8, 3), _dx_cfg(128, 64, 32, 8, 3),
                                         _dx_cfg(64, 128, 32, 8, 3)]
RANK_GRAD_CONFIGS_16 = {90: [_rg_cfg(128, 64, 8, 3), _rg_cfg(64, 64, 4, 3)]}
RANK_GRAD_CONFIGS_16[80] = RANK_GRAD_CONFIGS_16[86] = [_rg_cfg(64, 64, 4, 3), _rg_cfg(128, 64, 8, 2)]
# fp32 (tf32 / tf32x3 dots): twice the bytes per element, so smaller K steps. On sm_8x tf32x3 holds
# its split operands in registers (mma.sync): 64x64 forward tiles spill 600-1000 bytes at rank 64
# there, so narrower tiles still.
FWD_CONFIGS_32 = {90: [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 8, 3)]}
FWD_CONFIGS_32[80] = FWD_CONFIGS_32[86] = [_cfg(32, 64, 32, 4, 3)]
# sm_90 dX, tf32x3 at rank 64: 4 warps spill (104 B); with Triton 3.6 so do 128-row tiles (128x64x32:
# 24 B, 128x64x16: 8 B), with the two-segment noise.
DX_CONFIGS_32 = {90: [_dx_cfg(64, 64, 32, 8, 3)]}
# sm_8x: 64x32x16 w4 spills 16 B on sm_80; 64x64x16 w8 20 B on sm_86 with Triton 3.6 (segments, r64).
DX_CONFIGS_32[80] = DX_CONFIGS_32[86] = [_dx_cfg(32, 64, 16, 4, 3), _dx_cfg(64, 32, 16, 8, 3)]
RANK_GRAD_CONFIGS_32 = {90: [_rg_cfg(64, 64, 4, 3)]}
RANK_GRAD_CONFIGS_32[80] = RANK_GRAD_CONFIGS_32[86] = [_rg_cfg(64, 32, 8, 3), _rg_cfg(64, 32, 4, 3)]

# The interpreter runs every program in Python, one op at a time: big tiles mean fewer programs.
_INTERP_FWD = _cfg(64, 64, 64, 4, 1)
_INTERP_DX = _cfg(64, 64, 64, 4, 1, _DX_NAMES)
_INTERP_RANK_GRAD = _rg_cfg(64, 64, 4, 1)
