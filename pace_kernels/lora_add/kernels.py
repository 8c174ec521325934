"""The ``lora_add`` Triton kernels: forward, dX (with ``P = Gz B``) and the rank gradients
(docs/design.md section 9.2).

Both kernel families follow one convention (docs/design.md section 9.1): operands are row-major
(the ops make them so), so only row strides are passed and the last dimension is addressed with
unit stride, which lets loads along it vectorise; row offsets are int64. A GEMM tile wraps its
output rows and columns into range (``% N``) for its loads, which then need a mask along the
reduction only, and masks its stores; a kernel that sums over rows (the rank gradients) masks
them, so no row is counted twice.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton_utils import NOISE_GATHER, NOISE_NONE, NOISE_SEGMENTS, cdiv, dot_acc, grouped_tile


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, db_ptr, z_ptr, y_ptr, u_ptr,
    N, D, K, RANK, rows_per_noise,
    stride_xm, stride_wd, stride_ar, stride_bd, stride_zm, stride_ym, stride_um,
    HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr, FOLD_DB: tl.constexpr, NOISE: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Y = X W0^T + b0 + Zr * (U B^T + db)`` and ``U = X A^T``; ``NOISE``: NONE, GATHER or SEGMENTS."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), cdiv(N, BLOCK_M), cdiv(D, BLOCK_N), GROUP_M)
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
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] + cols[None, :].to(tl.int64) * stride_wd
    a_ptrs = a_ptr + offs_k[:, None] + offs_r[None, :] * stride_ar
    r_ok = offs_r < RANK

    # b0 seeds the accumulator, so no bias registers stay live into the epilogue.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k in range(0, cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_acc(x, w, acc, UPCAST, PRECISION)
        u = dot_acc(x, a, u, UPCAST, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K

    m_ok = offs_m < N
    n_ok = offs_n < D
    # U is rounded to the input dtype, as the reference's F.linear(x, A) is.
    u_lo = u.to(dtype)
    if pid_n == 0:
        u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :]
        tl.store(u_ptrs, u_lo, mask=m_ok[:, None] & r_ok[None, :])

    bt = tl.load(b_ptr + offs_r[:, None] + cols[None, :] * stride_bd, mask=r_ok[:, None], other=0.0)
    if FOLD_DB:
        # db rides in the first padded rank slot: a column of ones in U, db as that row of B^T.
        slot = offs_r == RANK
        u_lo = tl.where(slot[None, :], 1.0, u_lo.to(tl.float32)).to(dtype)
        bt = tl.where(slot[:, None], tl.load(db_ptr + cols)[None, :], bt).to(dtype)

    if NOISE == NOISE_NONE:
        acc = dot_acc(u_lo, bt, acc, UPCAST, PRECISION)
        if HAS_DB and not FOLD_DB:
            acc += tl.load(db_ptr + cols).to(tl.float32)[None, :]
    elif NOISE == NOISE_GATHER:
        # Any noise layout: gather the noise row of every output row, scale a second accumulator.
        delta = dot_acc(u_lo, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        if HAS_DB and not FOLD_DB:
            delta += tl.load(db_ptr + cols).to(tl.float32)[None, :]
        z_rows = rows // rows_per_noise
        z = tl.load(z_ptr + z_rows[:, None] * stride_zm + cols[None, :])
        acc += delta * z.to(tl.float32)
    else:
        # NOISE_SEGMENTS, samples of >= BLOCK_M - 1 rows: the tile holds rows of at most two
        # samples s, and Zr * (U B^T) = sum_s U[rows of s] (B * z_s)^T: two r-wide dots into the
        # same accumulator, no second [BLOCK_M, BLOCK_N] tile and no gathered noise tile.
        first = (pid_m * BLOCK_M) // rows_per_noise
        sample = offs_m // rows_per_noise
        for j in tl.static_range(2):
            s = first + j
            z = tl.load(z_ptr + s.to(tl.int64) * stride_zm + cols, mask=s * rows_per_noise < N, other=0.0)
            bz = (bt.to(tl.float32) * z.to(tl.float32)[None, :]).to(dtype)
            us = tl.where((sample == s)[:, None], u_lo.to(tl.float32), 0.0).to(dtype)
            acc = dot_acc(us, bz, acc, UPCAST, PRECISION)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_dx_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, z_ptr, dx_ptr, p_ptr,
    N, D, K, RANK, rows_per_noise,
    stride_gm, stride_wd, stride_ar, stride_bd, stride_zm, stride_dxm, stride_pm,
    NOISE: tl.constexpr, COMPUTE_DX: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dX = G W0 + P A`` and ``P = Gz B``; ``NOISE``: NONE, GATHER or SEGMENTS."""
    if COMPUTE_DX:
        pid_m, pid_k = grouped_tile(tl.program_id(0), cdiv(N, BLOCK_M), cdiv(K, BLOCK_K), GROUP_M)
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
    # Wrapped edges, as in the forward.
    rows = (offs_m % N).to(tl.int64)
    cols = offs_k % K
    r_ok = offs_r < RANK
    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_d[None, :]
    # int32 offsets suffice here, unlike the forward's column offsets: a tile of the row-major
    # weight stays below BLOCK_D * K, and the loop advances the (64-bit) pointers. An int64 tile
    # costs registers: 16 bytes of spill at BM128 r64 tf32x3 on sm_90.
    w_ptrs = w_ptr + offs_d[:, None] * stride_wd + cols[None, :]
    b_ptrs = b_ptr + offs_d[:, None] * stride_bd + offs_r[None, :]
    if NOISE == NOISE_GATHER:
        z_rows = rows // rows_per_noise
        z_ptrs = z_ptr + z_rows[:, None] * stride_zm + offs_d[None, :]
    if NOISE == NOISE_SEGMENTS:
        # Per-sample noise, at most two samples per row tile (see the forward): P = Gz B is
        # G (B * z_s) on the rows of sample s, one accumulator per sample, G never rescaled.
        first = (pid_m * BLOCK_M) // rows_per_noise
        z0_ptrs = z_ptr + first.to(tl.int64) * stride_zm + offs_d
        z1_ptrs = z0_ptrs + stride_zm
        has_second = (first + 1) * rows_per_noise < N
        p1 = tl.zeros((BLOCK_M, R), dtype=tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for d in range(0, cdiv(D, BLOCK_D)):
        d_ok = offs_d < D - d * BLOCK_D
        g = tl.load(g_ptrs, mask=d_ok[None, :], other=0.0)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=d_ok[:, None], other=0.0)
            acc = dot_acc(g, w, acc, UPCAST, PRECISION)
        lb = tl.load(b_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        if NOISE == NOISE_NONE:
            p = dot_acc(g, lb, p, UPCAST, PRECISION)
        elif NOISE == NOISE_GATHER:
            # Gz exists only in registers; rounded to the input dtype as the reference's G * z is.
            z = tl.load(z_ptrs, mask=d_ok[None, :], other=0.0)
            gz = (g.to(tl.float32) * z.to(tl.float32)).to(dtype)
            p = dot_acc(gz, lb, p, UPCAST, PRECISION)
            z_ptrs += BLOCK_D
        else:
            z0 = tl.load(z0_ptrs, mask=d_ok, other=0.0).to(tl.float32)
            z1 = tl.load(z1_ptrs, mask=d_ok & has_second, other=0.0).to(tl.float32)
            p = dot_acc(g, (lb.to(tl.float32) * z0[:, None]).to(dtype), p, UPCAST, PRECISION)
            p1 = dot_acc(g, (lb.to(tl.float32) * z1[:, None]).to(dtype), p1, UPCAST, PRECISION)
            z0_ptrs += BLOCK_D
            z1_ptrs += BLOCK_D
        g_ptrs += BLOCK_D
        w_ptrs += BLOCK_D * stride_wd
        b_ptrs += BLOCK_D * stride_bd

    if NOISE == NOISE_SEGMENTS:
        p = tl.where((offs_m // rows_per_noise > first)[:, None], p1, p)
    m_ok = offs_m < N
    p_lo = p.to(dtype)
    if pid_k == 0:
        p_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_r[None, :]
        tl.store(p_ptrs, p_lo, mask=m_ok[:, None] & r_ok[None, :])
    if COMPUTE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :], mask=r_ok[:, None], other=0.0)
        acc = dot_acc(p_lo, a, acc, UPCAST, PRECISION)
        dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
        tl.store(dx_ptrs, acc.to(dtype), mask=m_ok[:, None] & (offs_k < K)[None, :])


@triton.jit
def _rank_grad_kernel(
    l_ptr, z_ptr, r_ptr, out_ptr, colsum_ptr,
    N, F, RANK, rows_per_noise, rows_per_split,
    stride_lm, stride_zm, stride_rm, stride_os, stride_of, stride_cs,
    NOISE: tl.constexpr, HAS_COLSUM: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[s] = L[rows of split s]^T (Zr *) Rm[rows of split s]``: a ``[F, r]`` partial sum per
    split, for ``dB = Gz^T U`` (with ``colsum(Gz)`` for ``d db``) and ``dA^T = X^T P``; ``NOISE``:
    NONE or GATHER. Rows past the split are masked, not wrapped, so each row is summed once."""
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
        lt = tl.load(l_ptr + offs_f[:, None] + rows[None, :] * stride_lm,
                     mask=f_ok[:, None] & row_ok[None, :], other=0.0)
        if NOISE == NOISE_GATHER:
            z_rows = rows // rows_per_noise
            z = tl.load(z_ptr + offs_f[:, None] + z_rows[None, :] * stride_zm,
                        mask=f_ok[:, None] & row_ok[None, :], other=0.0)
            lt = (lt.to(tl.float32) * z.to(tl.float32)).to(l_ptr.dtype.element_ty)
        if HAS_COLSUM:
            colsum += tl.sum(lt.to(tl.float32), axis=1)
        rm = tl.load(r_ptr + rows[:, None] * stride_rm + offs_r[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_acc(lt, rm, acc, UPCAST, PRECISION)

    out_ptrs = out_ptr + pid_s * stride_os + offs_f[:, None] * stride_of + offs_r[None, :]
    tl.store(out_ptrs, acc, mask=f_ok[:, None] & r_ok[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_s * stride_cs + offs_f, colsum, mask=f_ok)
