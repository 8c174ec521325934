"""The ``lora_mul`` Triton kernels: per-sample GEMMs against ``W_b = W0 * (1 + z_b M)`` built tile by
tile, the two-GEMM form for ragged tails, the noise-free GEMM, dX and dM (docs/design.md section 9.3)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton_utils import NOISE_GATHER, NOISE_SAMPLE, cdiv, dot_acc, grouped_tile, jit_helper

# ------------------------------------------------------------------------------------------------
# Kernels. One convention with lora_add (docs/design.md section 9.1): operands are row-major (the
# ops make them so), so only row strides are passed and the last dimension is addressed with unit
# stride, which lets loads along it vectorise; row offsets are int64 (N*K and N*D may pass 2^31).
# A GEMM tile wraps its output rows and columns into range for its loads (rows within the tile's
# own sample), which then need a mask along the reduction only, and masks its stores; dM, which
# sums over rows, masks them (a wrapped row would be counted twice) and its [D, K] tile too.


@jit_helper
def _noisy_weight(w, zm, UPCAST: tl.constexpr):
    # W_b = W0 * (1 + z M) from the W0 tile and the fp32 product tile z*M, rounded once to the
    # operand dtype (kept fp32 where the interpreter needs fp32 dot operands).
    wf = w.to(tl.float32)
    wb = wf + wf * zm
    if UPCAST:
        return wb
    else:
        return wb.to(w.dtype)


@jit_helper
def _scale(g, z, UPCAST: tl.constexpr):
    # Gz = G * z in the operand dtype (as autograd of the reference's `delta * z` rounds it).
    if UPCAST:
        return g.to(tl.float32) * z
    else:
        return g * z.to(g.dtype)


@jit_helper
def _segment_rows(pid_m, seg_len, seg_rows, BLOCK_M: tl.constexpr):
    # Row tiles never straddle two samples: tile pid_m covers rows local..local+BLOCK_M of sample
    # `seg` (rows seg*seg_len + local). Rows past seg_rows (the tail's, or the next sample's) wrap
    # onto the sample's own rows for the loads; the returned mask drops them at the store.
    tiles_per_seg = cdiv(seg_rows, BLOCK_M)
    seg = pid_m // tiles_per_seg
    local = (pid_m % tiles_per_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = seg.to(tl.int64) * seg_len + local % seg_rows
    return rows, local < seg_rows, seg


@jit_helper
def _mapped_rows(pid_m, n_rows, row_chunk, row_stride, row_off, BLOCK_M: tl.constexpr):
    # Logical row j is row (j // row_chunk) * row_stride + row_off + j % row_chunk: the identity
    # when row_chunk == n_rows (per-token noise), and "the last row_chunk rows of every sample"
    # for the ragged tails of per-sample tiles (row_stride = T, row_off = T - row_chunk). Rows past
    # n_rows wrap onto valid ones for the loads; the returned mask drops them at the store.
    j = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    jw = j % n_rows
    rows = (jw // row_chunk) * row_stride + row_off + jw % row_chunk
    return rows, j < n_rows


@triton.jit
def _lora_mul_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, z_ptr, bias_ptr, db_ptr, y_ptr,
    D, K, RANK, n_seg, seg_len, seg_rows,
    stride_xm, stride_wd, stride_ar, stride_bd, stride_zs, stride_ym,
    NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Y = X W^T + b0 + z db`` with one accumulator, loop over K.

    ``NOISE_SAMPLE``: every row tile lies in one sample b, and its weight ``W_b = W0 * (1 + z_b M)`` is
    built per K step from the ``W0`` tile and ``(z_b B) A``: an r-wide product whose left factor
    ``z_b B`` is loaded (and scaled) once per program. ``NOISE_NONE``: ``w_ptr`` holds the merged
    noise-free weight ``W0 * (1 + M)`` (``n_seg = 1``, ``seg_len = seg_rows = N``).

    The tile is computed transposed, ``Y^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] X^T``: the weight is
    then the left MMA operand, which Hopper's wgmma takes straight from registers, so the tile
    built there reaches the tensor cores without a round trip through shared memory.
    """
    pid = tl.program_id(0)
    num_pid_m = n_seg * cdiv(seg_rows, BLOCK_M)
    num_pid_n = cdiv(D, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok, seg = _segment_rows(pid_m, seg_len, seg_rows, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % D
    offs_k = tl.arange(0, BLOCK_K)

    xt_ptrs = x_ptr + rows[None, :] * stride_xm + offs_k[:, None]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wd + offs_k[None, :]
    if NOISE == NOISE_SAMPLE:
        offs_r = tl.arange(0, R)
        r_ok = offs_r < RANK
        z = tl.load(z_ptr + seg.to(tl.int64) * stride_zs + cols).to(tl.float32)
        zb = tl.load(b_ptr + cols[:, None] * stride_bd + offs_r[None, :], mask=r_ok[None, :], other=0.0)
        zb = zb.to(tl.float32) * z[:, None]
        if not UPCAST:
            zb = zb.to(w_ptr.dtype.element_ty)
        a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(xt_ptrs, mask=k_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        if NOISE == NOISE_SAMPLE:
            a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            zm = dot_acc(zb, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            w = _noisy_weight(w, zm, UPCAST)
            a_ptrs += BLOCK_K
        acc = dot_acc(w, xt, acc, UPCAST, PRECISION)
        xt_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[:, None]
    if HAS_DB:
        db = tl.load(db_ptr + cols).to(tl.float32)
        if NOISE == NOISE_SAMPLE:
            db = db * z
        acc += db[:, None]
    y_ptrs = y_ptr + rows[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_n < D)[:, None] & row_ok[None, :])


@jit_helper
def _masked_adapter(w, m):
    # W0*M from the W0 tile and the fp32 product tile M, rounded as the reference rounds both
    # (M to the operand dtype, then W0*M): the tail rows then round as the buffer they replace did.
    m = m.to(w.dtype).to(tl.float32)
    return (w.to(tl.float32) * m).to(w.dtype)


@triton.jit
def _lora_mul_fwd_two_gemm_kernel(
    x_ptr, w_ptr, wm_ptr, a_ptr, b_ptr, z_ptr, bias_ptr, db_ptr, y_ptr,
    D, K, RANK, n_rows, row_chunk, row_stride, row_off, rows_per_z,
    stride_xm, stride_wd, stride_ar, stride_bd, stride_zr, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr, FACTORS: tl.constexpr, R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Y = X W0^T + b0 + z (X (W0*M)^T + db)`` with a noise row per row (per-token noise, or
    the ragged tails of per-sample tiles): two accumulators, each as wide as BLOCK_N. The noise is
    always gathered per row (``NOISE_GATHER``, the only mode, so no constexpr chooses it).

    FACTORS: the ``W0*M`` tile is built per K step from the ``W0`` tile and ``B A`` (an r-wide
    product; the ``B`` rows are loaded once per program), so no ``D x K`` buffer exists; otherwise
    ``wm_ptr`` holds ``W0*M`` (the launcher's choice, docs/design.md section 9.3)."""
    pid = tl.program_id(0)
    num_pid_m = cdiv(n_rows, BLOCK_M)
    num_pid_n = cdiv(D, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok = _mapped_rows(pid_m, n_rows, row_chunk, row_stride, row_off, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % D
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wd + offs_k[None, :]
    if FACTORS:
        offs_r = tl.arange(0, R)
        r_ok = offs_r < RANK
        b = tl.load(b_ptr + cols[:, None] * stride_bd + offs_r[None, :], mask=r_ok[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :]
    else:
        wm_ptrs = wm_ptr + cols[:, None].to(tl.int64) * stride_wd + offs_k[None, :]
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        if FACTORS:
            a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            m = dot_acc(b, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            wm = _masked_adapter(w, m)
            a_ptrs += BLOCK_K
        else:
            wm = tl.load(wm_ptrs, mask=k_ok[None, :], other=0.0)
            wm_ptrs += BLOCK_K
        acc_w = dot_acc(x, tl.trans(w), acc_w, UPCAST, PRECISION)
        acc_m = dot_acc(x, tl.trans(wm), acc_m, UPCAST, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    z = tl.load(z_ptr + (rows // rows_per_z)[:, None] * stride_zr + cols[None, :])
    if HAS_DB:
        acc_m += tl.load(db_ptr + cols).to(tl.float32)[None, :]
    acc_w += z.to(tl.float32) * acc_m
    if HAS_BIAS:
        acc_w += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc_w.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < D)[None, :])


@triton.jit
def _lora_mul_dx_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, z_ptr, dx_ptr,
    D, K, RANK, n_seg, seg_len, seg_rows,
    stride_gm, stride_wd, stride_ar, stride_bd, stride_zs, stride_dxm,
    NOISE: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dX = G W`` with one accumulator, loop over D (BLOCK_K of them per step); BLOCK_N spans in
    features. ``NOISE_SAMPLE``: ``W = W_b`` built per step as in the forward, now transposed:
    ``W_b^T = W0^T * (1 + (A^T B^T) z_b)``, with ``A^T`` loaded once per program and the noise
    along the reduction. ``NOISE_NONE``: ``w_ptr`` is the merged noise-free weight. Computed
    transposed, ``dX^T [BLOCK_N, BLOCK_M] = W^T G^T``, for the forward's reason.
    """
    pid = tl.program_id(0)
    num_pid_m = n_seg * cdiv(seg_rows, BLOCK_M)
    num_pid_n = cdiv(K, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok, seg = _segment_rows(pid_m, seg_len, seg_rows, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % K
    offs_d = tl.arange(0, BLOCK_K)

    gt_ptrs = g_ptr + rows[None, :] * stride_gm + offs_d[:, None]
    wt_ptrs = w_ptr + offs_d[None, :].to(tl.int64) * stride_wd + cols[:, None]
    if NOISE == NOISE_SAMPLE:
        offs_r = tl.arange(0, R)
        r_ok = offs_r < RANK
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + cols[:, None], mask=r_ok[None, :], other=0.0)
        if UPCAST:
            at = at.to(tl.float32)
        bt_ptrs = b_ptr + offs_d[None, :] * stride_bd + offs_r[:, None]
        z_ptrs = z_ptr + seg.to(tl.int64) * stride_zs + offs_d

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d_ok = offs_d < D - d0
        gt = tl.load(gt_ptrs, mask=d_ok[:, None], other=0.0)
        wt = tl.load(wt_ptrs, mask=d_ok[None, :], other=0.0)
        if NOISE == NOISE_SAMPLE:
            bt = tl.load(bt_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            z = tl.load(z_ptrs, mask=d_ok, other=0.0).to(tl.float32)
            mt = dot_acc(at, bt, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            wt = _noisy_weight(wt, mt * z[None, :], UPCAST)
            bt_ptrs += BLOCK_K * stride_bd
            z_ptrs += BLOCK_K
        acc = dot_acc(wt, gt, acc, UPCAST, PRECISION)
        gt_ptrs += BLOCK_K
        wt_ptrs += BLOCK_K * stride_wd

    dx_ptrs = dx_ptr + rows[None, :] * stride_dxm + offs_n[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_n < K)[:, None] & row_ok[None, :])


@triton.jit
def _lora_mul_dx_two_gemm_kernel(
    g_ptr, w_ptr, wm_ptr, a_ptr, b_ptr, z_ptr, dx_ptr,
    D, K, RANK, n_rows, row_chunk, row_stride, row_off, rows_per_z,
    stride_gm, stride_wd, stride_ar, stride_bd, stride_zr, stride_dxm,
    FACTORS: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dX = G W0 + Gz (W0*M)`` with a noise row per row (``NOISE_GATHER``, the only mode): both
    products go into one accumulator (a GEMM over the concatenated reduction [G, Gz] x [W0; W0*M]).
    FACTORS: the ``W0*M`` tile is built per step from ``B`` rows and the ``A`` columns loaded once
    per program, as in the forward."""
    pid = tl.program_id(0)
    num_pid_m = cdiv(n_rows, BLOCK_M)
    num_pid_n = cdiv(K, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok = _mapped_rows(pid_m, n_rows, row_chunk, row_stride, row_off, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % K
    offs_d = tl.arange(0, BLOCK_K)

    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_d[None, :]
    z_ptrs = z_ptr + (rows // rows_per_z)[:, None] * stride_zr + offs_d[None, :]
    w_ptrs = w_ptr + offs_d[:, None].to(tl.int64) * stride_wd + cols[None, :]
    if FACTORS:
        offs_r = tl.arange(0, R)
        r_ok = offs_r < RANK
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :], mask=r_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        b_ptrs = b_ptr + offs_d[:, None] * stride_bd + offs_r[None, :]
    else:
        wm_ptrs = wm_ptr + offs_d[:, None].to(tl.int64) * stride_wd + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d_ok = offs_d < D - d0
        g = tl.load(g_ptrs, mask=d_ok[None, :], other=0.0)
        z = tl.load(z_ptrs, mask=d_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=d_ok[:, None], other=0.0)
        if FACTORS:
            b = tl.load(b_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            m = dot_acc(b, a, tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            wm = _masked_adapter(w, m)
            b_ptrs += BLOCK_K * stride_bd
        else:
            wm = tl.load(wm_ptrs, mask=d_ok[:, None], other=0.0)
            wm_ptrs += BLOCK_K * stride_wd
        acc = dot_acc(g, w, acc, UPCAST, PRECISION)
        acc = dot_acc(_scale(g, z, UPCAST), wm, acc, UPCAST, PRECISION)
        g_ptrs += BLOCK_K
        z_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wd

    dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + offs_n[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < K)[None, :])


@triton.jit
def _lora_mul_dm_kernel(
    g_ptr, x_ptr, z_ptr, w_ptr, dm_ptr, ddb_ptr,
    N, D, K, rows_per_z, rows_per_split,
    stride_gm, stride_xm, stride_zr, stride_wd, stride_dms, stride_dmd, stride_ddbs,
    NOISE: tl.constexpr, HAS_DB: tl.constexpr, SCALE_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Gz^T X`` over the rows of split ``program_id(1)`` (``rows_per_split`` of them), tile
    [out features, in features], fp32, into slot ``s`` of ``dm`` (``[S, D, K]``); ``NOISE_GATHER``:
    ``Gz = z G`` is formed per step from the gathered noise rows (``row // rows_per_z``);
    ``NOISE_NONE``: ``Gz = G``. The programs of the first
    column tile also sum the split's ``Gz`` over rows into slot ``s`` of ``ddb`` (``[S, D]``): the
    partial ``d db = colsum(Gz)``. SCALE_W (one split): the tile is the whole sum and is multiplied
    by ``W0`` here, ``dM = (Gz^T X) * W0``; otherwise the launcher sums the slots in a fixed order
    and multiplies after. Each slot element has exactly one owner: no atomics."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = cdiv(D, BLOCK_M)
    num_pid_n = tl.maximum(cdiv(K, BLOCK_N), 1)  # as the grid: one column tile sums d db when K == 0
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    rows = row_start + tl.arange(0, BLOCK_K).to(tl.int64)

    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_d[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, rows_per_split, BLOCK_K):
        r = rows + n0
        r_ok = r < row_end
        g = tl.load(g_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        if NOISE == NOISE_GATHER:
            z_ptrs = z_ptr + (r // rows_per_z)[:, None] * stride_zr + offs_d[None, :]
            z = tl.load(z_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            g = _scale(g, z, UPCAST)
        x = tl.load(x_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot_acc(tl.trans(g), x, acc, UPCAST, PRECISION)
        if HAS_DB:
            if pid_n == 0:
                db_acc += tl.sum(g.to(tl.float32), axis=0)
        g_ptrs += BLOCK_K * stride_gm
        x_ptrs += BLOCK_K * stride_xm

    if SCALE_W:
        w = tl.load(w_ptr + offs_d[:, None].to(tl.int64) * stride_wd + offs_k[None, :],
                    mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = acc * w.to(tl.float32)
    dm_ptrs = (dm_ptr + pid_s.to(tl.int64) * stride_dms + offs_d[:, None].to(tl.int64) * stride_dmd
               + offs_k[None, :])
    tl.store(dm_ptrs, acc, mask=d_ok[:, None] & k_ok[None, :])
    if HAS_DB:
        tl.store(ddb_ptr + pid_s * stride_ddbs + offs_d, db_acc, mask=d_ok & (pid_n == 0))
