"""The ``lora_add`` Triton kernels: forward, dX (with ``P = Gz B``) and the rank gradients
(docs/design.md section 9.2)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton_utils import dot_acc, jit_helper


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
