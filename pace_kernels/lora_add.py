"""Fused ``lora_add`` linear layer: Triton kernels, autograd and the ``torch.library`` op.

    Y = X W0^T + b0 + Zr * (U B^T + db),   U = X A^T        (docs/design.md section 3)

Forward, one kernel (``_fwd_kernel``): each program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``Y``
and, in the same K loop that accumulates ``X W0^T`` (seeded with ``b0``), accumulates
``U = X A^T`` (``[BLOCK_M, R]``, ``R`` the rank padded to a power of two >= 16), so ``X`` is read
once. The programs of the first column tile store ``U``. The epilogue adds ``Zr * (U B^T + db)``;
``db`` rides in a spare padded rank slot (a ones column of ``U``) when there is one. Noise paths:
- none: one more r-wide dot into the accumulator;
- per-sample noise with samples of >= 128 rows (ViT's 197 tokens): a row tile holds at most two
  samples, and ``Zr * (U B^T) = sum_s U[rows of s] (B * z_s)^T``: two r-wide dots into the same
  accumulator, no second output-sized tile in registers, no gathered noise tile;
- otherwise (per-token noise, short samples): a second accumulator scaled by the noise row gathered
  for every output row (``row // rows_per_noise``).
Saved for backward: ``X``, ``U [N, r]``, the noise and the parameters; no ``N x D`` activation.

Backward, three launches, no ``N x D`` temporary besides ``G`` and no atomics:
- ``_bwd_dx_kernel``: ``dX = G W0 + (Gz B) A``. Each program owns a ``[BLOCK_M, BLOCK_K]`` tile of
  ``dX`` and loops over D; ``P = Gz B`` (``[BLOCK_M, R]``) is accumulated beside ``G W0`` from the
  same ``G`` tile, ``Gz = Zr * G`` formed on the fly: in registers from a gathered noise tile, or,
  with long samples, as ``G (B * z_s)`` per sample (one small accumulator each). The epilogue adds
  ``P A``; the first column tile stores ``P`` (``N x r``, small) for ``dA``. When ``dX`` is not
  needed (a frozen input) the grid is one program per row tile, which computes and stores ``P``.
- ``_rank_grad_kernel`` twice: ``dB = Gz^T U`` with ``d db = colsum(Gz)``, and ``dA^T = X^T P``.
  Rows are split into a fixed number of chunks (chosen from the shapes only); every program sums
  its chunk into its own slot of an fp32 ``[splits, F, r]`` buffer, and the slots are summed by
  ``torch.sum`` in a fixed order: deterministic, bitwise identical run to run.

All dots accumulate in fp32; ``U`` and ``P`` are rounded to the input dtype like the reference's
intermediate results. In the interpreter bf16 dot operands are upcast (docs/design.md section 7).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    DOT_VARIANTS,
    TRITON_DTYPE_NAMES,
    CompileSpec,
    autotune_for_device,
    config_label,
    configs_for_arch,
    contiguous_or_none,
    dot_acc,
    dot_flags,
    frozen_weight,
    jit_helper,
    padded_rank,
    register_op,
    wrap_triton,
)

__all__ = ["lora_add_fwd", "lora_add_bwd", "compile_specs", "MAX_RANK"]

MAX_RANK = 64
"""Largest rank the kernels take; larger ranks run the reference path."""


# --------------------------------------------------------------------------------------------
# Kernels


@jit_helper
def _tile_ids(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles sweep the column tiles together, so the weight tiles
    # they share stay in L2.
    num_pid_m = tl.cdiv(n_rows, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, db_ptr, z_ptr, y_ptr, u_ptr,
    N, D, K, RANK, rows_per_noise,
    stride_xm, stride_xk,
    stride_wd, stride_wk,
    stride_ar, stride_ak,
    stride_bd, stride_br,
    stride_zm, stride_zd,
    stride_ym, stride_yd,
    stride_um, stride_ur,
    HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr, FOLD_DB: tl.constexpr, NOISE: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), N, D, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = y_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    # Rows and columns past the edge wrap onto valid ones, so the K loop needs masks along K only;
    # their results are dropped by the store masks. Row offsets are int64: N*K may pass 2^31, and
    # so may D*K, the weight's column offsets (cols * stride_wd).
    rows = (offs_m % N).to(tl.int64)
    cols = offs_n % D
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wd
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    r_ok = offs_r < RANK

    # b0 seeds the accumulator, so no bias registers stay live into the epilogue.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_acc(x, w, acc, UPCAST, PRECISION)
        u = dot_acc(x, a, u, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    m_ok = offs_m < N
    n_ok = offs_n < D
    # U is rounded to the input dtype, as the reference's F.linear(x, A) is.
    u_lo = u.to(dtype)
    if pid_n == 0:
        u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
        tl.store(u_ptrs, u_lo, mask=m_ok[:, None] & r_ok[None, :])

    bt = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bd,
                 mask=r_ok[:, None], other=0.0)
    if FOLD_DB:
        # db rides in the first padded rank slot: a column of ones in U, db as that row of B^T.
        slot = offs_r == RANK
        u_lo = tl.where(slot[None, :], 1.0, u_lo.to(tl.float32)).to(dtype)
        bt = tl.where(slot[:, None], tl.load(db_ptr + cols)[None, :], bt).to(dtype)

    if NOISE == 0:
        acc = dot_acc(u_lo, bt, acc, UPCAST, PRECISION)
        if HAS_DB and not FOLD_DB:
            acc += tl.load(db_ptr + cols).to(tl.float32)[None, :]
    elif NOISE == 1:
        # Any noise layout: gather the noise row of every output row, scale a second accumulator.
        delta = dot_acc(u_lo, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        if HAS_DB and not FOLD_DB:
            delta += tl.load(db_ptr + cols).to(tl.float32)[None, :]
        z_rows = (rows // rows_per_noise).to(tl.int64)
        z = tl.load(z_ptr + z_rows[:, None] * stride_zm + cols[None, :] * stride_zd)
        acc += delta * z.to(tl.float32)
    else:
        # Per-sample noise, samples of >= BLOCK_M - 1 rows: the tile holds rows of at most two
        # samples s, and Zr * (U B^T) = sum_s U[rows of s] (B * z_s)^T: two r-wide dots into the
        # same accumulator, no second [BLOCK_M, BLOCK_N] tile and no gathered noise tile.
        first = (pid_m * BLOCK_M) // rows_per_noise
        sample = offs_m // rows_per_noise
        for j in tl.static_range(2):
            s = first + j
            z = tl.load(z_ptr + s.to(tl.int64) * stride_zm + cols * stride_zd,
                        mask=s * rows_per_noise < N, other=0.0)
            bz = (bt.to(tl.float32) * z.to(tl.float32)[None, :]).to(dtype)
            us = tl.where((sample == s)[:, None], u_lo.to(tl.float32), 0.0).to(dtype)
            acc = dot_acc(us, bz, acc, UPCAST, PRECISION)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yd
    tl.store(y_ptrs, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_dx_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, z_ptr, dx_ptr, p_ptr,
    N, D, K, RANK, rows_per_noise,
    stride_gm, stride_gd,
    stride_wd, stride_wk,
    stride_ar, stride_ak,
    stride_bd, stride_br,
    stride_zm, stride_zd,
    stride_dxm, stride_dxk,
    stride_pm, stride_pr,
    NOISE: tl.constexpr, COMPUTE_DX: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    if COMPUTE_DX:
        pid_m, pid_k = _tile_ids(tl.program_id(0), N, K, BLOCK_M, BLOCK_K, GROUP_M)
    else:
        # Only P is wanted: one program per row tile (the grid has no column tiles), so G is read
        # once, not once per column tile of dX.
        pid_m = tl.program_id(0)
        pid_k = 0
    dtype = dx_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, R)
    rows = (offs_m % N).to(tl.int64)
    cols = offs_k % K
    r_ok = offs_r < RANK
    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd
    # int32 offsets suffice here, unlike the forward's cols * stride_wd: the op passes a row-major
    # weight, so a tile's offsets stay below BLOCK_D * K, and the loop advances the (64-bit)
    # pointers. An int64 tile costs registers: 16 bytes of spill at BM128 r64 tf32x3 on sm_90.
    w_ptrs = w_ptr + offs_d[:, None] * stride_wd + cols[None, :] * stride_wk
    b_ptrs = b_ptr + offs_d[:, None] * stride_bd + offs_r[None, :] * stride_br
    if NOISE == 1:
        z_rows = (rows // rows_per_noise).to(tl.int64)
        z_ptrs = z_ptr + z_rows[:, None] * stride_zm + offs_d[None, :] * stride_zd
    if NOISE == 2:
        # Per-sample noise, at most two samples per row tile (see the forward): P = Gz B is
        # G (B * z_s) on the rows of sample s, one accumulator per sample, G never rescaled.
        first = (pid_m * BLOCK_M) // rows_per_noise
        z0_ptrs = z_ptr + first.to(tl.int64) * stride_zm + offs_d * stride_zd
        z1_ptrs = z0_ptrs + stride_zm
        has_second = (first + 1) * rows_per_noise < N
        p1 = tl.zeros((BLOCK_M, R), dtype=tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for d in range(0, tl.cdiv(D, BLOCK_D)):
        d_ok = offs_d < D - d * BLOCK_D
        g = tl.load(g_ptrs, mask=d_ok[None, :], other=0.0)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=d_ok[:, None], other=0.0)
            acc = dot_acc(g, w, acc, UPCAST, PRECISION)
        lb = tl.load(b_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        if NOISE == 0:
            p = dot_acc(g, lb, p, UPCAST, PRECISION)
        elif NOISE == 1:
            # Gz exists only in registers; rounded to the input dtype as the reference's G * z is.
            z = tl.load(z_ptrs, mask=d_ok[None, :], other=0.0)
            gz = (g.to(tl.float32) * z.to(tl.float32)).to(dtype)
            p = dot_acc(gz, lb, p, UPCAST, PRECISION)
            z_ptrs += BLOCK_D * stride_zd
        else:
            z0 = tl.load(z0_ptrs, mask=d_ok, other=0.0).to(tl.float32)
            z1 = tl.load(z1_ptrs, mask=d_ok & has_second, other=0.0).to(tl.float32)
            p = dot_acc(g, (lb.to(tl.float32) * z0[:, None]).to(dtype), p, UPCAST, PRECISION)
            p1 = dot_acc(g, (lb.to(tl.float32) * z1[:, None]).to(dtype), p1, UPCAST, PRECISION)
            z0_ptrs += BLOCK_D * stride_zd
            z1_ptrs += BLOCK_D * stride_zd
        g_ptrs += BLOCK_D * stride_gd
        w_ptrs += BLOCK_D * stride_wd
        b_ptrs += BLOCK_D * stride_bd

    if NOISE == 2:
        p = tl.where((offs_m // rows_per_noise > first)[:, None], p1, p)
    m_ok = offs_m < N
    p_lo = p.to(dtype)
    if pid_k == 0:
        p_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_r[None, :] * stride_pr
        tl.store(p_ptrs, p_lo, mask=m_ok[:, None] & r_ok[None, :])
    if COMPUTE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=r_ok[:, None], other=0.0)
        acc = dot_acc(p_lo, a, acc, UPCAST, PRECISION)
        dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dtype), mask=m_ok[:, None] & (offs_k < K)[None, :])


@triton.jit
def _rank_grad_kernel(
    l_ptr, z_ptr, r_ptr, out_ptr, colsum_ptr,
    N, F, RANK, rows_per_noise, rows_per_split,
    stride_lm, stride_lf,
    stride_zm, stride_zf,
    stride_rm, stride_rr,
    stride_os, stride_of, stride_or,
    stride_cs, stride_cf,
    HAS_NOISE: tl.constexpr, HAS_COLSUM: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[s] = L[rows of split s]^T (Zr *) Rm[rows of split s]: a [F, r] partial sum per split.
    # Used for dB = Gz^T U (with colsum(Gz) for d db) and for dA^T = X^T P.
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    f_ok = offs_f < F
    r_ok = offs_r < RANK
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)

    acc = tl.zeros((BLOCK_F, R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for n0 in range(0, rows_per_split, BLOCK_N):
        rows = row_start + n0 + offs_n
        row_ok = rows < row_end
        # L^T tile [BLOCK_F, BLOCK_N], read straight from row-major L.
        lt = tl.load(l_ptr + offs_f[:, None] * stride_lf + rows[None, :] * stride_lm,
                     mask=f_ok[:, None] & row_ok[None, :], other=0.0)
        if HAS_NOISE:
            z_rows = rows // rows_per_noise
            z = tl.load(z_ptr + offs_f[:, None] * stride_zf + z_rows[None, :] * stride_zm,
                        mask=f_ok[:, None] & row_ok[None, :], other=0.0)
            lt = (lt.to(tl.float32) * z.to(tl.float32)).to(l_ptr.dtype.element_ty)
        if HAS_COLSUM:
            colsum += tl.sum(lt.to(tl.float32), axis=1)
        rm = tl.load(r_ptr + rows[:, None] * stride_rm + offs_r[None, :] * stride_rr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_acc(lt, rm, acc, UPCAST, PRECISION)

    out_ptrs = out_ptr + pid_s * stride_os + offs_f[:, None] * stride_of + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=f_ok[:, None] & r_ok[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_s * stride_cs + offs_f * stride_cf, colsum, mask=f_ok)


# --------------------------------------------------------------------------------------------
# Configs, per GPU class (``autotune_for_device``): 90 Hopper (227 KiB of shared memory per
# block, wgmma), 80 A100 (163 KiB), 86 the 99 KiB parts (sm_86/sm_89: RTX 30xx/40xx, A10, L4,
# L40S). Every entry compiles for its archs with tensor cores, no spills and within the shared
# memory at rank <= 64 (``python -m pace_kernels.compile_check --arch N``); the first of each list
# is what runs with autotuning off. The interpreter runs one small config instead.


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
DX_CONFIGS_32[80] = DX_CONFIGS_32[86] = [_dx_cfg(64, 64, 16, 8, 3)]  # 64x32x16 w4: 16 B spill, sm_80
RANK_GRAD_CONFIGS_32 = {90: [_rg_cfg(64, 64, 4, 3)]}
RANK_GRAD_CONFIGS_32[80] = RANK_GRAD_CONFIGS_32[86] = [_rg_cfg(64, 32, 8, 3), _rg_cfg(64, 32, 4, 3)]

# The interpreter runs every program in Python, one op at a time: big tiles mean fewer programs.
_INTERP_FWD = _cfg(64, 64, 64, 4, 1)
_INTERP_DX = _cfg(64, 64, 64, 4, 1, _DX_NAMES)
_INTERP_RANK_GRAD = _rg_cfg(64, 64, 4, 1)

_SHAPE_KEY = ["N", "D", "K", "R"]
_fwd_16 = autotune_for_device(_fwd_kernel, FWD_CONFIGS_16, _INTERP_FWD, _SHAPE_KEY)
_fwd_32 = autotune_for_device(_fwd_kernel, FWD_CONFIGS_32, _INTERP_FWD, _SHAPE_KEY)
_dx_16 = autotune_for_device(_bwd_dx_kernel, DX_CONFIGS_16, _INTERP_DX, _SHAPE_KEY)
_dx_32 = autotune_for_device(_bwd_dx_kernel, DX_CONFIGS_32, _INTERP_DX, _SHAPE_KEY)
_RG_KEY = ["N", "F", "R"]
_rank_grad_16 = autotune_for_device(_rank_grad_kernel, RANK_GRAD_CONFIGS_16, _INTERP_RANK_GRAD, _RG_KEY)
_rank_grad_32 = autotune_for_device(_rank_grad_kernel, RANK_GRAD_CONFIGS_32, _INTERP_RANK_GRAD, _RG_KEY)


# --------------------------------------------------------------------------------------------
# Launchers (fake-tensor traceable: torch ops and wrap_triton launches only)


SEGMENT_MIN_ROWS = 128
"""Per-sample noise with at least this many rows per sample (the largest BLOCK_M of any config) takes
the two-segment path: a row tile then never holds rows of more than two samples."""


def check_segment_tile(block_m: int, rows_per_noise: int) -> None:
    """The two-segment path (``NOISE == 2``) is right only while a row tile holds rows of at most two
    samples, i.e. ``BLOCK_M <= T + 1``: refuse a config that breaks it (a future 256-row tile, say)
    rather than mix three samples' noise in one tile."""
    if block_m > rows_per_noise + 1:
        raise RuntimeError(
            f"lora_add: a row tile of BLOCK_M={block_m} rows can span three samples of {rows_per_noise} "
            f"rows, which the two-segment noise path cannot handle; every config's BLOCK_M must be at "
            f"most SEGMENT_MIN_ROWS + 1 = {SEGMENT_MIN_ROWS + 1}")


def _unit_stride(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    # The kernels take the strides of their 2-D operands but read b0 and db with unit stride, and
    # compute some offsets (K-strided ones) in int32: the ops make every operand row-major, which
    # costs nothing for the contiguous tensors the public entry point passes.
    return [contiguous_or_none(t) for t in tensors]


def _noise_mode(noise: torch.Tensor | None, rows_per_noise: int, folds_db: bool, has_db: bool) -> int:
    """0: no noise; 1: gather a noise row per output row; 2: per-sample segments (see _fwd_kernel)."""
    if noise is None:
        return 0
    if rows_per_noise >= SEGMENT_MIN_ROWS and (folds_db or not has_db):
        return 2
    return 1


def _num_splits(n_rows: int, n_cols: int) -> int:
    """Row chunks of the rank-gradient reductions: enough programs to fill a GPU (about 4 per SM
    of an H100 with 128-wide column tiles), at least 256 rows each. A function of the shapes only,
    so the summation order never changes between runs."""
    col_tiles = triton.cdiv(n_cols, 128)
    return max(1, min(triton.cdiv(n_rows, 256), triton.cdiv(4 * 132, col_tiles)))


def _rank_grads(lhs: torch.Tensor, rhs: torch.Tensor, noise: torch.Tensor | None, rows_per_noise: int,
               with_colsum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lhs^T (Zr *) rhs [F, r] fp32, colsum(Zr * lhs) [F] fp32 or None)``, deterministically."""
    n_rows, n_cols = lhs.shape
    rank = rhs.shape[1]
    splits = _num_splits(n_rows, n_cols)
    rows_per_split = triton.cdiv(n_rows, splits)
    partial = torch.empty((splits, n_cols, rank), device=lhs.device, dtype=torch.float32)
    colsum = torch.empty((splits, n_cols) if with_colsum else (1, 1), device=lhs.device, dtype=torch.float32)
    z = noise if noise is not None else lhs
    upcast, precision = dot_flags(lhs.dtype)

    def grid(meta):
        return (triton.cdiv(n_cols, meta["BLOCK_F"]), splits)

    wrap_triton(_rank_grad_32 if lhs.dtype == torch.float32 else _rank_grad_16)[grid](
        lhs, z, rhs, partial, colsum,
        n_rows, n_cols, rank, max(rows_per_noise, 1), rows_per_split,
        lhs.stride(0), lhs.stride(1),
        z.stride(0), z.stride(1),
        rhs.stride(0), rhs.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        colsum.stride(0), colsum.stride(1),
        HAS_NOISE=noise is not None, HAS_COLSUM=with_colsum,
        R=padded_rank(rank), UPCAST=upcast, PRECISION=precision,
    )
    return partial.sum(0), (colsum.sum(0) if with_colsum else None)


def _forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, delta_bias: torch.Tensor | None, noise: torch.Tensor | None,
                  rows_per_noise: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, lora_a, lora_b, bias, delta_bias, noise = _unit_stride(x, lora_a, lora_b, bias, delta_bias, noise)
    weight = frozen_weight(weight, x.dtype)
    n_rows, k_in = x.shape
    d_out, rank = lora_b.shape
    y = torch.empty((n_rows, d_out), device=x.device, dtype=x.dtype)
    u = torch.empty((n_rows, rank), device=x.device, dtype=x.dtype)
    if n_rows == 0 or d_out == 0:
        return y, u
    upcast, precision = dot_flags(x.dtype)
    kernel = _fwd_32 if x.dtype == torch.float32 else _fwd_16
    z = noise if noise is not None else x
    r_pad = padded_rank(rank)
    fold_db = delta_bias is not None and rank < r_pad
    noise_mode = _noise_mode(noise, rows_per_noise, fold_db, delta_bias is not None)

    def grid(meta):
        if noise_mode == 2:
            check_segment_tile(meta["BLOCK_M"], rows_per_noise)
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

    wrap_triton(kernel)[grid](
        x, weight, bias if bias is not None else x, lora_a, lora_b,
        delta_bias if delta_bias is not None else x, z, y, u,
        n_rows, d_out, k_in, rank, max(rows_per_noise, 1),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        z.stride(0), z.stride(1),
        y.stride(0), y.stride(1),
        u.stride(0), u.stride(1),
        HAS_BIAS=bias is not None, HAS_DB=delta_bias is not None, FOLD_DB=fold_db,
        NOISE=noise_mode, R=r_pad, UPCAST=upcast, PRECISION=precision,
    )
    return y, u


def _forward_fake(x, weight, bias, lora_a, lora_b, delta_bias, noise, rows_per_noise):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


def _backward_impl(grad_y: torch.Tensor, x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                   lora_a: torch.Tensor, lora_b: torch.Tensor, noise: torch.Tensor | None,
                   rows_per_noise: int,
                   need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g, x, u, lora_a, lora_b, noise = _unit_stride(grad_y, x, u, lora_a, lora_b, noise)
    weight = frozen_weight(weight, x.dtype)
    n_rows, k_in = x.shape
    d_out, rank = lora_b.shape
    dx = torch.empty((n_rows, k_in) if need_dx else (0, k_in), device=x.device, dtype=x.dtype)
    if n_rows == 0 or d_out == 0:
        return (dx.zero_(), lora_a.new_zeros(lora_a.shape), lora_b.new_zeros(lora_b.shape),
                x.new_zeros((d_out,)))
    if k_in == 0:
        # Y = b0 + Zr * db (U = X A^T is 0): dX and dA are empty, dB = Gz^T U = 0, d db = colsum(Gz).
        d_lora_b, d_delta_bias = _rank_grads(g, u, noise, rows_per_noise, with_colsum=True)
        return dx, lora_a.new_zeros(lora_a.shape), d_lora_b.to(x.dtype), d_delta_bias.to(x.dtype)
    p = torch.empty((n_rows, rank), device=x.device, dtype=x.dtype)
    upcast, precision = dot_flags(x.dtype)
    kernel = _dx_32 if x.dtype == torch.float32 else _dx_16
    z = noise if noise is not None else g
    dx_arg = dx if need_dx else p  # never written when COMPUTE_DX is off
    noise_mode = _noise_mode(noise, rows_per_noise, True, False)

    def grid(meta):
        if noise_mode == 2:
            check_segment_tile(meta["BLOCK_M"], rows_per_noise)
        # Without dX only P = Gz B is computed: one program per row tile.
        col_tiles = triton.cdiv(k_in, meta["BLOCK_K"]) if need_dx else 1
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * col_tiles,)

    wrap_triton(kernel)[grid](
        g, weight, lora_a, lora_b, z, dx_arg, p,
        n_rows, d_out, k_in, rank, max(rows_per_noise, 1),
        g.stride(0), g.stride(1),
        weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        z.stride(0), z.stride(1),
        dx_arg.stride(0), dx_arg.stride(1),
        p.stride(0), p.stride(1),
        NOISE=noise_mode, COMPUTE_DX=need_dx,
        R=padded_rank(rank), UPCAST=upcast, PRECISION=precision,
    )
    d_lora_b, d_delta_bias = _rank_grads(g, u, noise, rows_per_noise, with_colsum=True)
    d_lora_a_t, _ = _rank_grads(x, p, None, 1, with_colsum=False)
    return dx, d_lora_a_t.t().contiguous().to(x.dtype), d_lora_b.to(x.dtype), d_delta_bias.to(x.dtype)


def _backward_fake(grad_y, x, u, weight, lora_a, lora_b, noise, rows_per_noise, need_dx):
    return (x.new_empty(x.shape if need_dx else (0, x.shape[1])), lora_a.new_empty(lora_a.shape),
            lora_b.new_empty(lora_b.shape), x.new_empty((weight.shape[0],)))


lora_add_fwd = register_op(
    "pace::lora_add_fwd", _forward_impl, _forward_fake,
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor? delta_bias, "
           "Tensor? noise, SymInt rows_per_noise) -> (Tensor, Tensor)")
lora_add_bwd = register_op(
    "pace::lora_add_bwd", _backward_impl, _backward_fake,
    schema="(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? noise, "
           "SymInt rows_per_noise, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)")


# --------------------------------------------------------------------------------------------
# Autograd of pace::lora_add_fwd, registered on the op: calling torch.ops.pace.lora_add_fwd is
# differentiable, and torch.compile traces it without a graph break.


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, delta_bias, noise, rows_per_noise = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, u, weight, lora_a, lora_b, noise)
    ctx.rows_per_noise = rows_per_noise
    ctx.has_delta_bias = delta_bias is not None


def _backward(ctx, grad_y: torch.Tensor, grad_u: torch.Tensor) -> tuple:
    x, u, weight, lora_a, lora_b, noise = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b, d_db = torch.ops.pace.lora_add_bwd(
        grad_y, x, u, weight, lora_a, lora_b, noise, ctx.rows_per_noise, need_dx)
    return (dx if need_dx else None, None, None,
            d_a if ctx.needs_input_grad[3] else None,
            d_b if ctx.needs_input_grad[4] else None,
            d_db if ctx.has_delta_bias and ctx.needs_input_grad[5] else None,
            None, None)


lora_add_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Compile check


_NOISE_NAMES = {1: "gather", 2: "segments"}


def compile_specs(arch: int = 90) -> list[CompileSpec]:
    """Every kernel in every config ``sm_<arch>`` runs, at the worst-case constexprs (bias, delta bias
    and noise on, both noise paths), at rank 16 and 64 (the smallest and largest padded rank), for
    each dtype its list serves; fp32 rows for both dot precisions (tf32, tf32x3)."""
    specs: list[CompileSpec] = []
    common = dict(N="i32", D="i32", K="i32", RANK="i32", rows_per_noise="i32")
    for dtype, precision in DOT_VARIANTS:
        t = TRITON_DTYPE_NAMES[dtype]
        wide = dtype == torch.float32
        suffix = f" {precision}" if wide else ""
        for r in (16, 64):
            fwd_configs = configs_for_arch(FWD_CONFIGS_32 if wide else FWD_CONFIGS_16, arch)
            for cfg, (noise, fold) in itertools.product(fwd_configs, ((1, False), (2, True))):
                consts = dict(cfg.kwargs, HAS_BIAS=True, HAS_DB=True, FOLD_DB=fold, NOISE=noise, R=r,
                              UPCAST=False, PRECISION=precision, stride_xk=1, stride_wk=1, stride_ak=1,
                              stride_br=1, stride_zd=1, stride_yd=1, stride_ur=1)
                sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}",
                           db_ptr=f"*{t}", z_ptr="*fp32", y_ptr=f"*{t}", u_ptr=f"*{t}", **common,
                           stride_xm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                           stride_zm="i32", stride_ym="i32", stride_um="i32")
                specs.append(CompileSpec(
                    f"lora_add_fwd {_NOISE_NAMES[noise]} r{r}{suffix}", _fwd_kernel, sig, consts,
                    cfg.num_warps, cfg.num_stages, dtype,
                    note=config_label(consts, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), cfg.num_warps,
                                      cfg.num_stages),
                    divisible=("D", "K", "stride_xm", "stride_wd", "stride_ar", "stride_zm", "stride_ym")))
            dx_configs = configs_for_arch(DX_CONFIGS_32 if wide else DX_CONFIGS_16, arch)
            for cfg, noise in itertools.product(dx_configs, (1, 2)):
                consts = dict(cfg.kwargs, NOISE=noise, COMPUTE_DX=True, R=r, UPCAST=False,
                              PRECISION=precision, stride_gd=1, stride_wk=1, stride_ak=1, stride_br=1,
                              stride_zd=1, stride_dxk=1, stride_pr=1)
                sig = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}", z_ptr="*fp32",
                           dx_ptr=f"*{t}", p_ptr=f"*{t}", **common,
                           stride_gm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                           stride_zm="i32", stride_dxm="i32", stride_pm="i32")
                specs.append(CompileSpec(
                    f"lora_add_bwd_dx {_NOISE_NAMES[noise]} r{r}{suffix}", _bwd_dx_kernel, sig, consts,
                    cfg.num_warps, cfg.num_stages,
                    dtype, note=config_label(consts, _DX_NAMES, cfg.num_warps, cfg.num_stages),
                    divisible=("D", "K", "stride_gm", "stride_wd", "stride_ar", "stride_zm", "stride_dxm")))
            for cfg in configs_for_arch(RANK_GRAD_CONFIGS_32 if wide else RANK_GRAD_CONFIGS_16, arch):
                consts = dict(cfg.kwargs, HAS_NOISE=True, HAS_COLSUM=True, R=r, UPCAST=False,
                              PRECISION=precision, stride_lf=1, stride_zf=1, stride_rr=1, stride_or=1,
                              stride_cf=1)
                sig = dict(l_ptr=f"*{t}", z_ptr="*fp32", r_ptr=f"*{t}", out_ptr="*fp32", colsum_ptr="*fp32",
                           N="i32", F="i32", RANK="i32", rows_per_noise="i32", rows_per_split="i32",
                           stride_lm="i32", stride_zm="i32", stride_rm="i32", stride_os="i32",
                           stride_of="i32", stride_cs="i32")
                specs.append(CompileSpec(
                    f"lora_add_rank_grad r{r}{suffix}", _rank_grad_kernel, sig, consts, cfg.num_warps,
                    cfg.num_stages, dtype,
                    note=config_label(consts, _RG_NAMES, cfg.num_warps, cfg.num_stages),
                    divisible=("F", "stride_lm", "stride_zm", "stride_os", "stride_of", "stride_cs")))
    return specs
