"""Fused ``lora_mul`` linear layer (and RLRR, its rank-1 case) with PACE noise: Triton kernels,
autograd and the ``torch.library`` op.

    Y = X W0^T + b0 + Zr * (X (W0*M)^T + db),   M = B A          (docs/design.md section 3)

Per-sample noise (tokens of a sample share ``z_b``) makes sample b's layer an ordinary linear
map, ``Y_b = X_b W_b^T + b0 + z_b db`` with ``W_b = W0 * (1 + z_b[:, None] * M)`` (docs/design.md section 3,
"Below five"). The kernels run one GEMM per sample against ``W_b`` built tile by tile:

- forward (``_lora_mul_fwd_kernel``): a row tile never straddles two samples; per K step the
  ``W_b`` tile is formed in registers from the ``W0`` tile and ``(z_b B) A`` (an r-wide MMA; ``z_b B``
  is loaded once per program) and fed to the tensor cores as the left operand of ``Y^T = W_b X^T``
  (wgmma reads a left operand from registers, so the built tile never goes back to shared
  memory). Bias, ``b0`` and ``z_b db`` are added in the epilogue; no ``N x D`` intermediate.
- ``dX_b = G_b W_b`` (``_lora_mul_dx_kernel``): the same tiles, transposed.
- ``dM = (Gz^T X) * W0`` (``_lora_mul_dm_kernel``): ``Gz = Zr * G`` is formed per step from the
  gathered noise rows; ``d db = colsum(Gz)`` comes from the same loads (the first column tile's
  programs only, so each row is summed once). The rows are split into ``S`` chunks
  (:func:`dm_splits`, from the shapes only) when the ``[D, K]`` tiles alone would leave the GPU
  idle; each program writes an fp32 partial into its own slot of an ``[S, D, K]`` buffer (and of
  ``[S, D]`` for ``d db``), summed by ``torch.sum`` in a fixed order and then multiplied by ``W0``
  (with ``S = 1`` the kernel multiplies and writes ``dM`` itself). ``dB = dM A^T`` and
  ``dA = B^T dM`` are small cuBLAS products on that fp32 ``D x K``; the partials and ``dM`` are
  transients of the backward call, freed before anything else of size ``D x K`` is made. Every
  output element has one owner: no atomics, the same bits every run.
- noise-free (``noise=None``: sigma 0, eval, ViT's first block): one GEMM against the merged
  ``W0 * (1 + M)``, built once per call (a transient ``D x K``, O(D K r) work).
- per-token noise, and the rows the per-sample tiles leave over (below): the two-GEMM form
  (``_lora_mul_fwd_two_gemm_kernel``: two accumulators against ``W0`` and a transient ``W0*M``;
  ``_lora_mul_dx_two_gemm_kernel``: one accumulator over the reduction ``[G, Gz] x [W0; W0*M]``).

Saved for backward: ``X``, the noise, ``W0`` (the frozen parameter itself, not a copy) and the
factors; never a ``D x K`` tensor of the op's own and never an ``N x D`` one. Under autocast too:
the op takes the fp32 master ``W0`` and casts it per call (``frozen_weight``), a transient.

Cost model
==========
GEMM-equivalents (MMA work, one ``N x K x D`` product = 1; fwd + dX + dM):

- noise-free: 1 + 1 + 1 = 3.  Two-GEMM form: 2 + 2 + 1 = 5.
- the dM pass is one GEMM-equivalent whatever its split. Without a split it runs one program per
  ``[D, K]`` tile, each looping over all N rows: ViT-B proj (768 x 768) at 128 x 128 tiles is 36
  programs on 132 SMs. :func:`dm_splits` picks ``S`` so that tiles x ``S`` reaches about 264
  (two per SM of an H100) with >= 1024 rows per split: proj ``S = 8`` (288 programs), qkv 3
  (324), fc1/fc2 2 (288), ``S = 1`` from 264 tiles up (LLM 4096 x 4096: 1024 tiles). A split costs
  ``S`` fp32 ``D x K`` partials written and read once more (proj, S = 8: 18 MiB each way, against
  at least the 74 MiB of ``G`` and ``X`` in bf16 that the pass reads at N = 2 x 64 x 197), and
  ``4 (S + 1) D K`` bytes (fp32) of transient memory at the peak.
- per-sample tiles: c + c + 1, where ``c`` is the MMA rows run per sample over ``T``
  (:func:`sample_plan`), plus the r-wide product that builds ``M``: ``R / BLOCK_M`` of the tile's
  main MMA, ``R`` the rank padded to a power of two >= 16 (RLRR and r <= 16: 1/4 at 64-row tiles,
  1/8 at 128; r = 64: 1 and 1/2).

Rows vs samples. A tile of ``bm`` rows either stays inside one sample (its last tile masked) or
straddles a boundary and runs one dot per sample it touches. MMA rows per useful row, B = 64
samples (``python``-checked in the tests):

    T     masked bm=64  masked 128  straddle 64  straddle 128  two-GEMM  chosen (c)         layer
    197   1.299 (23%)   1.299       1.320 (24%)  1.645 (39%)   2         bm 64, 1.025 (2.4%) 3.05
    50    1.280 (22%)   2.560 (61%) 2.240 (55%)  3.520 (72%)   2         bm 64, 1.280 (22%)  3.56
    2048  1             1           1            1             2         bm 128, 1           3.00
    1     64            128         64           128           2         two-GEMM, 2         5.00

(wasted fraction of the MMA work in brackets). Straddling always loses to masked tiles. The rule
(:func:`sample_plan`): full tiles of ``bm`` rows per sample; the ragged tail ``t = T % bm`` runs in
the two-GEMM kernel (2 t MMA rows) when ``2 t < bm``, else as one masked tile (bm rows); the
cheaper ``bm`` of 128 and 64 wins (128 on ties). T = 197 = 3 x 64 + 5: three full tiles and a
5-row tail in the two-GEMM form (ViT's ``T = p^2 + 1`` leaves 1 row when 8 divides p: T = 257,
577). ``T < bm / 2``
(tiny T, e.g. per-token noise or 2-D inputs) runs wholly in the two-GEMM form: that is where the
per-sample design loses, and the dispatch falls back by this count, not by a threshold guess.

Bytes per output tile (bf16, L2 -> SM, the whole K loop plus the output store):

    tile / K             noise-free  W0 + W0*M buffer  factors (chosen)  two-GEMM
    128x128, K=768       416 KiB     608 KiB           444 KiB (+12%)    608 KiB, 2x MMA
    64x128,  K=768       304 KiB     496 KiB           332 KiB (+25%)    496 KiB, 2x MMA
    128x128, K=4096      2080 KiB    3104 KiB          2212 KiB (+12%)   3104 KiB, 2x MMA
    64x128,  K=4096      1552 KiB    2576 KiB          1684 KiB (+25%)   2576 KiB, 2x MMA

(ViT-B fc1: K=768, D=3072, N = 2B x 197; LLM: K=D=4096, T=2048; factors' extra MMA at r <= 16 in
brackets.) Inside the SM, per K step of 32 (bf16, 8 warps, 128x128; counted from the PTX of both
drafts: every tile is staged by cp.async, read back by ld.shared where it is built, and read by
wgmma): noise-free moves 40 KiB through shared memory; the ``W0*M``-buffer build 56 KiB (72 KiB
when the built tile is the right operand and goes back to shared memory, as in the draft of docs/design.md
section 9.3);
the factor build 43 KiB. The buffer build is cheaper in instructions (one packed bf16x2 FMA per
two elements against ~2.5 fp32 instructions per element) and costs no MMA, but these tiles are
bound by shared-memory and L2 traffic before MMA, most of all the 64-row tiles T = 197 needs, so
the factors win while ``R / BLOCK_M`` is small (r <= 16, the PACE and RLRR ranks); at r = 64 on
64-row tiles the r-wide product doubles the MMA and the two are about even, not worth a second
code path. Ranks above 64 run the reference path.
Both drafts compile for sm_90 with wgmma and 0 spill bytes (buffer, 128x128x32 w8 s4: 117
registers; 64x128x64 w4 s4: 188), as do the shipped configs (``compile_specs``).

``W_b`` is rounded once to the operand dtype, so its error is that of any bf16/fp16 weight
(absolute, about half an ulp of ``W0``), not relative to the small ``W0*M`` term; the reference's
output rounding is of the same size.

Expected totals at ViT-B (T = 197, r <= 16, 64-row tiles): 2 x 1.025 x 1.25 + 1 = 3.6 MMA
GEMM-equivalents against 5 for the two-GEMM form and 3 for the noise-free layer; at T = 2048:
2 x 1.125 + 1 = 3.25. These are counts, not timings: no GPU was lent while this was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    is_interpreting,
    jit_helper,
    padded_rank,
    register_op,
    wrap_triton,
)

__all__ = ["lora_mul_fwd", "lora_mul_bwd", "compile_specs", "sample_plan", "SamplePlan", "MAX_RANK"]

# ------------------------------------------------------------------------------------------------
# Row tiles and samples.


@dataclass(frozen=True)
class SamplePlan:
    """How the rows of one sample (``T`` of them, sharing one noise row) are cut into tiles.

    The first ``main_rows`` rows of every sample run in per-sample tiles of ``block_m`` rows (one
    dot against the sample's own weight ``W_b``; the last tile masked when ``main_rows`` is not a
    multiple of ``block_m``); the remaining ``tail_rows`` rows of every sample run in the
    two-GEMM kernel, which takes a noise row per row. ``cost_rows`` is the MMA work per sample in
    rows of one ordinary GEMM (so ``cost_rows / T`` is the pass's GEMM-equivalents).
    """

    block_m: int
    main_rows: int
    tail_rows: int
    cost_rows: int


def sample_plan(rows_per_sample: int, block_ms: Sequence[int]) -> SamplePlan:
    """Choose the per-sample row tiling for ``T = rows_per_sample`` by counting MMA rows.

    For a tile height ``bm`` let ``t = T % bm`` (the sample's ragged tail). The full tiles cost
    exactly their rows. The tail either runs as one more masked per-sample tile (``bm`` rows of
    MMA work) or in the two-GEMM form (two dots on its ``t`` rows, ``2 t``), whichever is less:
    the two-GEMM tail wins iff ``2 t < bm``. Among ``block_ms`` the cheapest plan wins, the first
    listed on ties (list the taller tile first: it reads the weight half as often). A sample
    shorter than half a tile therefore runs entirely in the two-GEMM form, which is the rule for
    tiny ``T`` (``T = 1``: per-token cost, 2 dots per row, never 64).
    """
    if rows_per_sample < 1:
        raise ValueError(f"rows_per_sample must be >= 1, got {rows_per_sample}")
    best: SamplePlan | None = None
    for bm in block_ms:
        tail = rows_per_sample % bm
        full = rows_per_sample - tail
        if tail == 0:
            plan = SamplePlan(bm, rows_per_sample, 0, rows_per_sample)
        elif 2 * tail < bm:
            plan = SamplePlan(bm, full, tail, full + 2 * tail)
        else:
            plan = SamplePlan(bm, rows_per_sample, 0, full + bm)
        if best is None or plan.cost_rows < best.cost_rows:
            best = plan
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------------
# Kernels. Every kernel assumes unit stride along its tensors' last dimension (the ops make
# them contiguous) and computes row offsets in int64: N*K and N*D may pass 2^31.


@jit_helper
def _cdiv(a, b):
    # tl.cdiv is itself a jit function, which the interpreter re-patches on every call (~4 ms).
    return (a + b - 1) // b


@jit_helper
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Consecutive programs share weight column tiles across GROUP_M row tiles, so the weight
    # (and W0*M) tiles they read stay in L2.
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


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
    # `seg` (rows seg*seg_len + local), masked at seg_rows (rows past it belong to the tail).
    tiles_per_seg = _cdiv(seg_rows, BLOCK_M)
    seg = pid_m // tiles_per_seg
    local = (pid_m % tiles_per_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = seg.to(tl.int64) * seg_len + local
    return rows, local < seg_rows, seg


@jit_helper
def _mapped_rows(pid_m, n_rows, row_chunk, row_stride, row_off, BLOCK_M: tl.constexpr):
    # Logical row j is row (j // row_chunk) * row_stride + row_off + j % row_chunk: the identity
    # when row_chunk == n_rows (per-token noise), and "the last row_chunk rows of every sample"
    # for the ragged tails of per-sample tiles (row_stride = T, row_off = T - row_chunk).
    j = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (j // row_chunk) * row_stride + row_off + j % row_chunk
    return rows, j < n_rows


@triton.jit
def _lora_mul_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, z_ptr, bias_ptr, db_ptr, y_ptr,
    D, K, RANK, n_seg, seg_len, seg_rows,
    stride_xm, stride_wd, stride_ar, stride_bd, stride_zs, stride_ym,
    PER_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr,
    R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Y = X W^T + b0 + z db`` with one accumulator, loop over K.

    PER_SAMPLE: every row tile lies in one sample b, and its weight ``W_b = W0 * (1 + z_b M)`` is
    built per K step from the ``W0`` tile and ``(z_b B) A``: an r-wide product whose left factor
    ``z_b B`` is loaded (and scaled) once per program. Otherwise ``w_ptr`` holds the merged
    noise-free weight ``W0 * (1 + M)`` (``n_seg = 1``, ``seg_len = seg_rows = N``).

    The tile is computed transposed, ``Y^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] X^T``: the weight is
    then the left MMA operand, which Hopper's wgmma takes straight from registers, so the tile
    built there reaches the tensor cores without a round trip through shared memory.
    """
    pid = tl.program_id(0)
    num_pid_m = n_seg * _cdiv(seg_rows, BLOCK_M)
    num_pid_n = _cdiv(D, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok, seg = _segment_rows(pid_m, seg_len, seg_rows, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    offs_k = tl.arange(0, BLOCK_K)

    xt_ptrs = x_ptr + rows[None, :] * stride_xm + offs_k[:, None]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wd + offs_k[None, :]
    if PER_SAMPLE:
        offs_r = tl.arange(0, R)
        r_ok = offs_r < RANK
        z = tl.load(z_ptr + seg.to(tl.int64) * stride_zs + cols, mask=col_ok, other=0.0).to(tl.float32)
        zb = tl.load(b_ptr + cols[:, None] * stride_bd + offs_r[None, :],
                     mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        zb = zb.to(tl.float32) * z[:, None]
        if not UPCAST:
            zb = zb.to(w_ptr.dtype.element_ty)
        a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(xt_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if PER_SAMPLE:
            a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            zm = dot_acc(zb, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            w = _noisy_weight(w, zm, UPCAST)
            a_ptrs += BLOCK_K
        acc = dot_acc(w, xt, acc, UPCAST, PRECISION)
        xt_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_DB:
        db = tl.load(db_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if PER_SAMPLE:
            db = db * z
        acc += db[:, None]
    y_ptrs = y_ptr + rows[None, :] * stride_ym + cols[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def _lora_mul_fwd_two_gemm_kernel(
    x_ptr, w_ptr, wm_ptr, z_ptr, bias_ptr, db_ptr, y_ptr,
    D, K, n_rows, row_chunk, row_stride, row_off, rows_per_z,
    stride_xm, stride_wd, stride_zr, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Y = X W0^T + b0 + z (X (W0*M)^T + db)`` with a noise row per row (per-token noise, or
    the ragged tails of per-sample tiles): two accumulators, each as wide as BLOCK_N."""
    pid = tl.program_id(0)
    num_pid_m = _cdiv(n_rows, BLOCK_M)
    num_pid_n = _cdiv(D, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok = _mapped_rows(pid_m, n_rows, row_chunk, row_stride, row_off, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wd + offs_k[None, :]
    wm_ptrs = wm_ptr + cols[:, None].to(tl.int64) * stride_wd + offs_k[None, :]
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        wm = tl.load(wm_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc_w = dot_acc(x, tl.trans(w), acc_w, UPCAST, PRECISION)
        acc_m = dot_acc(x, tl.trans(wm), acc_m, UPCAST, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        wm_ptrs += BLOCK_K

    out_ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(z_ptr + (rows // rows_per_z)[:, None] * stride_zr + cols[None, :], mask=out_ok, other=0.0)
    if HAS_DB:
        acc_m += tl.load(db_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc_w += z.to(tl.float32) * acc_m
    if HAS_BIAS:
        acc_w += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc_w.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _lora_mul_dx_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, z_ptr, dx_ptr,
    D, K, RANK, n_seg, seg_len, seg_rows,
    stride_gm, stride_wd, stride_ar, stride_bd, stride_zs, stride_dxm,
    PER_SAMPLE: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dX = G W`` with one accumulator, loop over D (BLOCK_K of them per step); BLOCK_N spans in
    features. PER_SAMPLE: ``W = W_b`` built per step as in the forward, now transposed:
    ``W_b^T = W0^T * (1 + (A^T B^T) z_b)``, with ``A^T`` loaded once per program and the noise
    along the reduction. Otherwise ``w_ptr`` is the merged noise-free weight. Computed
    transposed, ``dX^T [BLOCK_N, BLOCK_M] = W^T G^T``, for the forward's reason.
    """
    pid = tl.program_id(0)
    num_pid_m = n_seg * _cdiv(seg_rows, BLOCK_M)
    num_pid_n = _cdiv(K, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok, seg = _segment_rows(pid_m, seg_len, seg_rows, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    offs_d = tl.arange(0, BLOCK_K)

    gt_ptrs = g_ptr + rows[None, :] * stride_gm + offs_d[:, None]
    wt_ptrs = w_ptr + offs_d[None, :].to(tl.int64) * stride_wd + cols[:, None]
    if PER_SAMPLE:
        offs_r = tl.arange(0, R)
        r_ok = offs_r < RANK
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + cols[:, None],
                     mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            at = at.to(tl.float32)
        bt_ptrs = b_ptr + offs_d[None, :] * stride_bd + offs_r[:, None]
        z_ptrs = z_ptr + seg.to(tl.int64) * stride_zs + offs_d

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d_ok = offs_d < D - d0
        gt = tl.load(gt_ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if PER_SAMPLE:
            bt = tl.load(bt_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            z = tl.load(z_ptrs, mask=d_ok, other=0.0).to(tl.float32)
            mt = dot_acc(at, bt, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            wt = _noisy_weight(wt, mt * z[None, :], UPCAST)
            bt_ptrs += BLOCK_K * stride_bd
            z_ptrs += BLOCK_K
        acc = dot_acc(wt, gt, acc, UPCAST, PRECISION)
        gt_ptrs += BLOCK_K
        wt_ptrs += BLOCK_K * stride_wd

    dx_ptrs = dx_ptr + rows[None, :] * stride_dxm + cols[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def _lora_mul_dx_two_gemm_kernel(
    g_ptr, w_ptr, wm_ptr, z_ptr, dx_ptr,
    D, K, n_rows, row_chunk, row_stride, row_off, rows_per_z,
    stride_gm, stride_wd, stride_zr, stride_dxm,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dX = G W0 + Gz (W0*M)`` with a noise row per row: both products go into one
    accumulator (a GEMM over the concatenated reduction [G, Gz] x [W0; W0*M])."""
    pid = tl.program_id(0)
    num_pid_m = _cdiv(n_rows, BLOCK_M)
    num_pid_n = _cdiv(K, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    rows, row_ok = _mapped_rows(pid_m, n_rows, row_chunk, row_stride, row_off, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    offs_d = tl.arange(0, BLOCK_K)

    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_d[None, :]
    z_ptrs = z_ptr + (rows // rows_per_z)[:, None] * stride_zr + offs_d[None, :]
    w_ptrs = w_ptr + offs_d[:, None].to(tl.int64) * stride_wd + cols[None, :]
    wm_ptrs = wm_ptr + offs_d[:, None].to(tl.int64) * stride_wd + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d_ok = offs_d < D - d0
        g_mask = row_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptrs, mask=g_mask, other=0.0)
        z = tl.load(z_ptrs, mask=g_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        wm = tl.load(wm_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(g, w, acc, UPCAST, PRECISION)
        acc = dot_acc(_scale(g, z, UPCAST), wm, acc, UPCAST, PRECISION)
        g_ptrs += BLOCK_K
        z_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wd
        wm_ptrs += BLOCK_K * stride_wd

    dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_mul_dm_kernel(
    g_ptr, x_ptr, z_ptr, w_ptr, dm_ptr, ddb_ptr,
    N, D, K, rows_per_z, rows_per_split,
    stride_gm, stride_xm, stride_zr, stride_wd, stride_dms, stride_dmd, stride_ddbs,
    HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SCALE_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Gz^T X`` over the rows of split ``program_id(1)`` (``rows_per_split`` of them), tile
    [out features, in features], fp32, into slot ``s`` of ``dm`` (``[S, D, K]``); ``Gz = z G`` is
    formed per step from the gathered noise rows (``row // rows_per_z``). The programs of the first
    column tile also sum the split's ``Gz`` over rows into slot ``s`` of ``ddb`` (``[S, D]``): the
    partial ``d db = colsum(Gz)``. SCALE_W (one split): the tile is the whole sum and is multiplied
    by ``W0`` here, ``dM = (Gz^T X) * W0``; otherwise the launcher sums the slots in a fixed order
    and multiplies after. Each slot element has exactly one owner: no atomics."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = _cdiv(D, BLOCK_M)
    num_pid_n = tl.maximum(_cdiv(K, BLOCK_N), 1)  # as the grid: one column tile sums d db when K == 0
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
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
        if HAS_Z:
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


# ------------------------------------------------------------------------------------------------
# Configs, per GPU class (``autotune_for_device``): 90 Hopper (227 KiB of shared memory per block,
# wgmma), 80 A100 (163 KiB), 86 the 99 KiB parts (sm_86/sm_89: RTX 30xx/40xx, A10, L4, L40S).
# Every entry compiles for its archs with tensor cores, no spills and within the shared memory at
# rank <= 64 (``python -m pace_kernels.compile_check --arch N``); the first of each list is what
# runs with autotuning off. Tiles are (BLOCK_M rows of X, BLOCK_N output features, BLOCK_K
# reduction). The interpreter runs one small config instead (autotuning there would run every
# config, slowly).


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# sm_8x lists (mma.sync; 99 KiB on sm_86/89) serve A100 (sm_80) too: chosen for its register file,
# they fit its 163 KiB; larger A100 tiles are a tuning question for when one can be benchmarked.
# fp32 on sm_8x: tf32x3 holds its split operands in registers, so BLOCK_K 16 (64x64x32 spills).
_SM8X_32 = [_cfg(64, 64, 16, 8, 3), _cfg(64, 32, 16, 4, 3)]

# Noise-free GEMM against the merged weight (forward and dX).
_PLAIN_16 = [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
PLAIN_CONFIGS_16 = {90: _PLAIN_16, 80: _PLAIN_16, 86: _PLAIN_16}
PLAIN_CONFIGS_32 = {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32}
# Per-sample tiles, by the tile height sample_plan chose (forward and dX). On sm_8x the dX kernel
# spills at rank 64 with 64x128x64 and 64x256 tiles (and on sm_80 with 128x128x32 and 64x64x32 w4),
# the forward (8 B) with 128x64x64.
_SAMPLE_128_SM8X_16 = [_cfg(128, 64, 32, 8, 4)]
_SAMPLE_64_SM8X_16 = [_cfg(64, 128, 32, 8, 4), _cfg(64, 128, 32, 8, 3)]
SAMPLE_CONFIGS_16 = {
    128: {90: [_cfg(128, 128, 32, 8, 4), _cfg(128, 128, 64, 8, 3)], 80: _SAMPLE_128_SM8X_16,
          86: [_cfg(128, 128, 32, 8, 4)] + _SAMPLE_128_SM8X_16},
    64: {90: [_cfg(64, 256, 32, 8, 4), _cfg(64, 128, 32, 4, 4)], 80: _SAMPLE_64_SM8X_16,
         86: _SAMPLE_64_SM8X_16},
}
_SAMPLE_128_SM8X_32 = [_cfg(128, 32, 16, 8, 3), _cfg(128, 32, 32, 8, 3)]
SAMPLE_CONFIGS_32 = {
    128: {90: [_cfg(128, 64, 16, 8, 3)], 80: _SAMPLE_128_SM8X_32, 86: _SAMPLE_128_SM8X_32},
    64: {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32},
}
# Two-GEMM form: two accumulators in the forward (so half the width), one in dX. The Hopper dX
# configs need 122,880 and 172,032 bytes of shared memory on sm_86: three stages of 32-wide K there
# (64x128x32 with 4 warps spills 12 B on sm_80).
_TWO_GEMM_FWD_16 = [_cfg(128, 64, 64, 8, 3), _cfg(64, 64, 64, 4, 4)]
TWO_GEMM_FWD_CONFIGS_16 = {90: _TWO_GEMM_FWD_16, 80: _TWO_GEMM_FWD_16, 86: _TWO_GEMM_FWD_16}
TWO_GEMM_FWD_CONFIGS_32 = {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32}
_TWO_GEMM_DX_SM8X_16 = [_cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 4)]
TWO_GEMM_DX_CONFIGS_16 = {90: [_cfg(128, 128, 32, 8, 4), _cfg(64, 128, 64, 4, 4)], 80: _TWO_GEMM_DX_SM8X_16,
                          86: _TWO_GEMM_DX_SM8X_16}
TWO_GEMM_DX_CONFIGS_32 = {90: [_cfg(64, 64, 32, 4, 3)], 80: _SM8X_32, 86: _SM8X_32}
# dM = (Gz^T X) * W0: tiles of [D, K], reduction over the rows (every BLOCK_K divides 128).
_DM_SM8X_16 = [_cfg(128, 128, 32, 8, 4), _cfg(128, 128, 64, 8, 2), _cfg(64, 128, 32, 4, 4)]
DM_CONFIGS_16 = {90: [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(64, 128, 64, 4, 4)],
                 80: _DM_SM8X_16, 86: _DM_SM8X_16}
_DM_32 = [_cfg(64, 64, 32, 4, 3)]
DM_CONFIGS_32 = {90: _DM_32, 80: _DM_32, 86: _DM_32}

_INTERP_CONFIG = _cfg(64, 64, 64, 4, 1)
SAMPLE_BLOCK_MS: tuple[int, ...] = (64,) if is_interpreting() else (128, 64)
"""Tile heights :func:`sample_plan` chooses from (taller first)."""

MAX_RANK = 64
"""Largest rank the kernels take (the r-wide product pads it to 16, 32 or 64); larger ranks run
the reference path."""


def _tune(fn, configs: dict, key: Sequence[str]):
    return autotune_for_device(fn, configs, _INTERP_CONFIG, key)


_SEG_KEY = ("n_seg", "seg_rows", "D", "K", "R")
_ROWS_KEY = ("n_rows", "D", "K")
_fwd_plain = {16: _tune(_lora_mul_fwd_kernel, PLAIN_CONFIGS_16, _SEG_KEY),
              32: _tune(_lora_mul_fwd_kernel, PLAIN_CONFIGS_32, _SEG_KEY)}
_dx_plain = {16: _tune(_lora_mul_dx_kernel, PLAIN_CONFIGS_16, _SEG_KEY),
             32: _tune(_lora_mul_dx_kernel, PLAIN_CONFIGS_32, _SEG_KEY)}
_fwd_sample = {}
_dx_sample = {}
for _bm in SAMPLE_BLOCK_MS:
    for _bits, _table in ((16, SAMPLE_CONFIGS_16), (32, SAMPLE_CONFIGS_32)):
        _by_arch = _table.get(_bm, {90: [_INTERP_CONFIG]})
        _fwd_sample[_bits, _bm] = _tune(_lora_mul_fwd_kernel, _by_arch, _SEG_KEY)
        _dx_sample[_bits, _bm] = _tune(_lora_mul_dx_kernel, _by_arch, _SEG_KEY)
_fwd_two_gemm = {16: _tune(_lora_mul_fwd_two_gemm_kernel, TWO_GEMM_FWD_CONFIGS_16, _ROWS_KEY),
                 32: _tune(_lora_mul_fwd_two_gemm_kernel, TWO_GEMM_FWD_CONFIGS_32, _ROWS_KEY)}
_dx_two_gemm = {16: _tune(_lora_mul_dx_two_gemm_kernel, TWO_GEMM_DX_CONFIGS_16, _ROWS_KEY),
                32: _tune(_lora_mul_dx_two_gemm_kernel, TWO_GEMM_DX_CONFIGS_32, _ROWS_KEY)}
_dm = {16: _tune(_lora_mul_dm_kernel, DM_CONFIGS_16, ("N", "D", "K")),
       32: _tune(_lora_mul_dm_kernel, DM_CONFIGS_32, ("N", "D", "K"))}


# ------------------------------------------------------------------------------------------------
# Launchers (fake-tensor traceable: torch ops and wrap_triton launches only)


def _kernel_flags(dtype: torch.dtype) -> tuple[int, bool, str]:
    bits = 32 if dtype == torch.float32 else 16
    return (bits, *dot_flags(dtype))


def _adapter_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    merged: bool) -> torch.Tensor:
    """The call's one transient ``D x K``: ``W0*M`` for the two-GEMM kernels, or the merged
    ``W0*(1+M)`` for the noise-free GEMM. ``M`` and ``W0*M`` are rounded to the operand dtype as
    the reference rounds them."""
    w = torch.mm(lora_b, lora_a)
    w.mul_(weight)
    if merged:
        w.add_(weight)
    return w


DM_SPLIT_TARGET_PROGRAMS = 2 * 132
"""Programs the dM pass aims for: two per SM of an H100 (132 SMs)."""
DM_SPLIT_MIN_ROWS = 1024
"""Fewest rows a split of the dM reduction takes: below that the [S, D, K] partial traffic and the
final sum outweigh the extra parallelism."""
DM_SPLIT_TILE = 128
"""Tile edge the split count assumes for the [D, K] tiles (the largest dM config's)."""


def dm_splits(n_rows: int, d_out: int, k_in: int) -> tuple[int, int]:
    """``(S, rows_per_split)`` for the dM reduction over ``n_rows`` rows, from the shapes only (so
    the summation order never changes between runs): enough splits that the ``[D, K]`` tiles (at
    :data:`DM_SPLIT_TILE`) times ``S`` reach :data:`DM_SPLIT_TARGET_PROGRAMS`, each split at least
    :data:`DM_SPLIT_MIN_ROWS` rows; ``S = 1`` when the tiles alone fill the GPU. Splits are whole
    multiples of 128 rows (every dM ``BLOCK_K`` divides it), the last one shorter."""
    tiles = triton.cdiv(d_out, DM_SPLIT_TILE) * triton.cdiv(max(k_in, 1), DM_SPLIT_TILE)
    want = triton.cdiv(DM_SPLIT_TARGET_PROGRAMS, tiles)
    splits = max(1, min(want, n_rows // DM_SPLIT_MIN_ROWS))
    if splits == 1:
        return 1, max(n_rows, 1)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), 128) * 128
    return triton.cdiv(n_rows, rows_per_split), rows_per_split


def _launch_rows_kernels(kind: str, bits: int, plan: SamplePlan, n_seg: int, seg_len: int, per_sample_args,
                         two_gemm_args, out_cols: int, consts: dict) -> None:
    """Launch the per-sample kernel over the plan's main rows and the two-GEMM kernel over the
    tails (``kind`` is ``"fwd"`` or ``"dx"``)."""
    if plan.main_rows:
        tuned = (_fwd_sample if kind == "fwd" else _dx_sample)[bits, plan.block_m]

        def grid(meta):
            tiles_per_sample = triton.cdiv(plan.main_rows, meta["BLOCK_M"])
            return (n_seg * tiles_per_sample * triton.cdiv(out_cols, meta["BLOCK_N"]),)

        wrap_triton(tuned)[grid](*per_sample_args, **consts["sample"])
    if plan.tail_rows:
        tuned = (_fwd_two_gemm if kind == "fwd" else _dx_two_gemm)[bits]
        n_rows = n_seg * plan.tail_rows

        def grid2(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(out_cols, meta["BLOCK_N"]),)

        wrap_triton(tuned)[grid2](*two_gemm_args, **consts["two_gemm"])


def _forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, delta_bias: torch.Tensor | None, noise: torch.Tensor | None,
                  rows_per_noise: int) -> torch.Tensor:
    x, lora_a, lora_b, bias, delta_bias, noise = _unit_stride(x, lora_a, lora_b, bias, delta_bias, noise)
    weight = frozen_weight(weight, x.dtype)
    n_rows, k_in = x.shape
    d_out, rank = lora_b.shape
    y = torch.empty((n_rows, d_out), device=x.device, dtype=x.dtype)
    if n_rows == 0 or d_out == 0:
        return y
    bits, upcast, precision = _kernel_flags(x.dtype)
    bias_arg = bias if bias is not None else y
    db_arg = delta_bias if delta_bias is not None else y
    flags = dict(HAS_BIAS=bias is not None, HAS_DB=delta_bias is not None, UPCAST=upcast, PRECISION=precision)

    if noise is None:
        w = _adapter_weight(weight, lora_a, lora_b, merged=True)

        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

        wrap_triton(_fwd_plain[bits])[grid](
            x, w, w, w, y, bias_arg, db_arg, y,
            d_out, k_in, rank, 1, n_rows, n_rows,
            x.stride(0), w.stride(0), 0, 0, 0, y.stride(0),
            PER_SAMPLE=False, R=16, **flags,
        )
        return y

    seg_len = rows_per_noise
    n_seg = n_rows // seg_len
    plan = sample_plan(seg_len, SAMPLE_BLOCK_MS)
    wm = _adapter_weight(weight, lora_a, lora_b, merged=False) if plan.tail_rows else weight
    _launch_rows_kernels(
        "fwd", bits, plan, n_seg, seg_len,
        (x, weight, lora_a, lora_b, noise, bias_arg, db_arg, y,
         d_out, k_in, rank, n_seg, seg_len, plan.main_rows,
         x.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), noise.stride(0), y.stride(0)),
        (x, weight, wm, noise, bias_arg, db_arg, y,
         d_out, k_in, n_seg * plan.tail_rows, plan.tail_rows, seg_len, seg_len - plan.tail_rows, seg_len,
         x.stride(0), weight.stride(0), noise.stride(0), y.stride(0)),
        d_out,
        dict(sample=dict(PER_SAMPLE=True, R=padded_rank(rank), **flags), two_gemm=flags),
    )
    return y


def _unit_stride(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    # The kernels read every operand row-major (module note "Kernels"): the ops make their inputs
    # so, which costs nothing for the contiguous tensors the public entry point passes.
    return [contiguous_or_none(t) for t in tensors]


def _forward_fake(x, weight, bias, lora_a, lora_b, delta_bias, noise, rows_per_noise):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _backward_impl(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, noise: torch.Tensor | None, rows_per_noise: int, need_dx: bool,
                   need_factors: bool, need_db: bool) -> tuple[torch.Tensor, ...]:
    g, x, lora_a, lora_b, noise = _unit_stride(grad_y, x, lora_a, lora_b, noise)
    weight = frozen_weight(weight, x.dtype)
    n_rows, k_in = x.shape
    d_out, rank = lora_b.shape
    bits, upcast, precision = _kernel_flags(x.dtype)
    dx = torch.empty((n_rows, k_in) if need_dx else (0, k_in), device=x.device, dtype=x.dtype)
    if n_rows == 0 or d_out == 0:
        return dx.zero_(), torch.zeros_like(lora_a), torch.zeros_like(lora_b), x.new_zeros((d_out,))
    # The gradients are made below where they are needed; an output not asked for is zeros (the
    # op's schema returns four tensors), and only then is anything filled.
    d_lora_a = d_lora_b = d_db = None

    # dM (and d db) first: its fp32 D x K transients are freed before dX makes its own.
    if need_factors or need_db:
        splits, rows_per_split = dm_splits(n_rows, d_out, k_in)
        # One split: the kernel writes dM itself. Several: fp32 partials [S, D, K], summed below.
        dm = torch.empty((splits, d_out, k_in), device=x.device, dtype=torch.float32)
        db32 = torch.empty((splits, d_out), device=x.device, dtype=torch.float32)
        z = noise if noise is not None else g

        def grid_dm(meta):
            # at least one column tile, so d db is summed even when K == 0
            return (triton.cdiv(d_out, meta["BLOCK_M"]) * triton.cdiv(max(k_in, 1), meta["BLOCK_N"]), splits)

        wrap_triton(_dm[bits])[grid_dm](
            g, x, z, weight, dm, db32,
            n_rows, d_out, k_in, max(rows_per_noise, 1), rows_per_split,
            g.stride(0), x.stride(0), z.stride(0), weight.stride(0), dm.stride(0), dm.stride(1),
            db32.stride(0),
            HAS_Z=noise is not None, HAS_DB=need_db, SCALE_W=splits == 1, UPCAST=upcast,
            PRECISION=precision,
        )
        if splits == 1:
            dm, db32 = dm[0], db32[0]
        else:
            # torch.sum over the slots in a fixed order (no atomics): the same bits every run.
            partial = dm
            dm = partial.sum(0)
            del partial
            dm.mul_(weight)
            db32 = db32.sum(0)
        if need_factors:
            d_lora_a = torch.mm(lora_b.float().t(), dm).to(lora_a.dtype)
            d_lora_b = torch.mm(dm, lora_a.float().t()).to(lora_b.dtype)
        if need_db:
            d_db = db32.to(x.dtype)
        del dm

    if need_dx:
        consts = dict(UPCAST=upcast, PRECISION=precision)
        if noise is None:
            w = _adapter_weight(weight, lora_a, lora_b, merged=True)

            def grid(meta):
                return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(k_in, meta["BLOCK_N"]),)

            wrap_triton(_dx_plain[bits])[grid](
                g, w, w, w, g, dx,
                d_out, k_in, rank, 1, n_rows, n_rows,
                g.stride(0), w.stride(0), 0, 0, 0, dx.stride(0),
                PER_SAMPLE=False, R=16, **consts,
            )
        else:
            seg_len = rows_per_noise
            n_seg = n_rows // seg_len
            plan = sample_plan(seg_len, SAMPLE_BLOCK_MS)
            wm = _adapter_weight(weight, lora_a, lora_b, merged=False) if plan.tail_rows else weight
            _launch_rows_kernels(
                "dx", bits, plan, n_seg, seg_len,
                (g, weight, lora_a, lora_b, noise, dx,
                 d_out, k_in, rank, n_seg, seg_len, plan.main_rows,
                 g.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), noise.stride(0),
                 dx.stride(0)),
                (g, weight, wm, noise, dx,
                 d_out, k_in, n_seg * plan.tail_rows, plan.tail_rows, seg_len, seg_len - plan.tail_rows,
                 seg_len, g.stride(0), weight.stride(0), noise.stride(0), dx.stride(0)),
                k_in,
                dict(sample=dict(PER_SAMPLE=True, R=padded_rank(rank), **consts), two_gemm=consts),
            )
    if d_lora_a is None:
        d_lora_a, d_lora_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    if d_db is None:
        d_db = x.new_zeros((d_out,))
    return dx, d_lora_a, d_lora_b, d_db


def _backward_fake(grad_y, x, weight, lora_a, lora_b, noise, rows_per_noise, need_dx, need_factors, need_db):
    # Fresh row-major tensors, as the real kernel returns whatever the inputs' strides.
    return (x.new_empty(x.shape if need_dx else (0, x.shape[1])), lora_a.new_empty(lora_a.shape),
            lora_b.new_empty(lora_b.shape), x.new_empty((weight.shape[0],)))


lora_mul_fwd = register_op(
    "pace::lora_mul_fwd", _forward_impl, _forward_fake,
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor? delta_bias, "
           "Tensor? noise, SymInt rows_per_noise) -> Tensor")
lora_mul_bwd = register_op(
    "pace::lora_mul_bwd", _backward_impl, _backward_fake,
    schema="(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? noise, "
           "SymInt rows_per_noise, bool need_dx, bool need_factors, bool need_db) "
           "-> (Tensor, Tensor, Tensor, Tensor)")


# ------------------------------------------------------------------------------------------------
# Autograd of pace::lora_mul_fwd, registered on the op: calling torch.ops.pace.lora_mul_fwd is
# differentiable, and torch.compile traces it without a graph break. Saved: x, weight (the frozen
# parameter), the factors and the noise; nothing of size D x K or N x D is made for backward.


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, delta_bias, noise, rows_per_noise = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, noise)
    ctx.rows_per_noise = rows_per_noise
    ctx.has_delta_bias = delta_bias is not None


def _backward(ctx, grad_y: torch.Tensor) -> tuple:
    x, weight, lora_a, lora_b, noise = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_factors = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    need_db = ctx.has_delta_bias and ctx.needs_input_grad[5]
    dx, d_a, d_b, d_db = torch.ops.pace.lora_mul_bwd(
        grad_y, x, weight, lora_a, lora_b, noise, ctx.rows_per_noise, need_dx, need_factors, need_db)
    return (dx if need_dx else None, None, None,
            d_a if ctx.needs_input_grad[3] else None,
            d_b if ctx.needs_input_grad[4] else None,
            d_db if need_db else None,
            None, None)


lora_mul_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Compile check


def _spec(name: str, fn, sig: dict, consts: dict, cfg: triton.Config, dtype: torch.dtype,
          divisible: Sequence[str]) -> CompileSpec:
    consts = dict(cfg.kwargs, **consts)
    return CompileSpec(name, fn, sig, consts, cfg.num_warps, cfg.num_stages, dtype,
                       note=config_label(consts, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), cfg.num_warps,
                                         cfg.num_stages),
                       divisible=tuple(divisible))


def compile_specs(arch: int = 90) -> list[CompileSpec]:
    """Every kernel in every config ``sm_<arch>`` runs, at the worst-case constexprs (bias, delta bias
    and noise on; padded rank 16 and 64 where the rank enters) and the dtypes each list serves;
    fp32 rows for both dot precisions (tf32, tf32x3)."""
    specs: list[CompileSpec] = []
    for dtype, precision in DOT_VARIANTS:
        t = TRITON_DTYPE_NAMES[dtype]
        wide = dtype == torch.float32
        common = dict(UPCAST=False, PRECISION=precision)
        fwd_sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}", z_ptr="*fp32",
                       bias_ptr=f"*{t}", db_ptr=f"*{t}", y_ptr=f"*{t}", D="i32", K="i32", RANK="i32",
                       n_seg="i32", seg_len="i32", seg_rows="i32", stride_xm="i32", stride_wd="i32",
                       stride_ar="i32", stride_bd="i32", stride_zs="i32", stride_ym="i32")
        fwd_div = ("D", "K", "stride_xm", "stride_wd", "stride_ar", "stride_zs", "stride_ym")
        dx_sig = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", a_ptr=f"*{t}", b_ptr=f"*{t}", z_ptr="*fp32",
                      dx_ptr=f"*{t}", D="i32", K="i32", RANK="i32", n_seg="i32", seg_len="i32",
                      seg_rows="i32", stride_gm="i32", stride_wd="i32", stride_ar="i32", stride_bd="i32",
                      stride_zs="i32", stride_dxm="i32")
        dx_div = ("D", "K", "stride_gm", "stride_wd", "stride_ar", "stride_zs", "stride_dxm")
        rows_args = dict(D="i32", K="i32", n_rows="i32", row_chunk="i32", row_stride="i32", row_off="i32",
                         rows_per_z="i32")
        for cfg in configs_for_arch(PLAIN_CONFIGS_32 if wide else PLAIN_CONFIGS_16, arch):
            specs.append(_spec("lora_mul_fwd noise-free", _lora_mul_fwd_kernel, fwd_sig,
                               dict(PER_SAMPLE=False, HAS_BIAS=True, HAS_DB=True, R=16, **common), cfg, dtype,
                               fwd_div))
            specs.append(_spec("lora_mul_dx noise-free", _lora_mul_dx_kernel, dx_sig,
                               dict(PER_SAMPLE=False, R=16, **common), cfg, dtype, dx_div))
        for by_arch in (SAMPLE_CONFIGS_32 if wide else SAMPLE_CONFIGS_16).values():
            for cfg in configs_for_arch(by_arch, arch):
                for r in (16, 64):
                    specs.append(_spec(f"lora_mul_fwd per-sample r{r}", _lora_mul_fwd_kernel, fwd_sig,
                                       dict(PER_SAMPLE=True, HAS_BIAS=True, HAS_DB=True, R=r, **common),
                                       cfg, dtype, fwd_div))
                    specs.append(_spec(f"lora_mul_dx per-sample r{r}", _lora_mul_dx_kernel, dx_sig,
                                       dict(PER_SAMPLE=True, R=r, **common), cfg, dtype, dx_div))
        for cfg in configs_for_arch(TWO_GEMM_FWD_CONFIGS_32 if wide else TWO_GEMM_FWD_CONFIGS_16, arch):
            sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", wm_ptr=f"*{t}", z_ptr="*fp32", bias_ptr=f"*{t}",
                       db_ptr=f"*{t}", y_ptr=f"*{t}", **rows_args, stride_xm="i32", stride_wd="i32",
                       stride_zr="i32", stride_ym="i32")
            specs.append(_spec("lora_mul_fwd two-GEMM", _lora_mul_fwd_two_gemm_kernel, sig,
                               dict(HAS_BIAS=True, HAS_DB=True, **common), cfg, dtype,
                               ("D", "K", "stride_xm", "stride_wd", "stride_zr", "stride_ym")))
        for cfg in configs_for_arch(TWO_GEMM_DX_CONFIGS_32 if wide else TWO_GEMM_DX_CONFIGS_16, arch):
            sig = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", wm_ptr=f"*{t}", z_ptr="*fp32", dx_ptr=f"*{t}",
                       **rows_args, stride_gm="i32", stride_wd="i32", stride_zr="i32", stride_dxm="i32")
            specs.append(_spec("lora_mul_dx two-GEMM", _lora_mul_dx_two_gemm_kernel, sig, dict(common), cfg,
                               dtype,
                               ("D", "K", "stride_gm", "stride_wd", "stride_zr", "stride_dxm")))
        for cfg in configs_for_arch(DM_CONFIGS_32 if wide else DM_CONFIGS_16, arch):
            sig = dict(g_ptr=f"*{t}", x_ptr=f"*{t}", z_ptr="*fp32", w_ptr=f"*{t}", dm_ptr="*fp32",
                       ddb_ptr="*fp32", N="i32", D="i32", K="i32", rows_per_z="i32", rows_per_split="i32",
                       stride_gm="i32", stride_xm="i32", stride_zr="i32", stride_wd="i32",
                       stride_dms="i32", stride_dmd="i32", stride_ddbs="i32")
            for scale_w in (True, False):
                consts = dict(HAS_Z=True, HAS_DB=True, SCALE_W=scale_w, **common)
                # one split: rows_per_split = N, any value; several: multiples of 128 rows
                divisible = ("D", "K", "stride_gm", "stride_xm", "stride_zr", "stride_wd", "stride_dms",
                             "stride_dmd", "stride_ddbs") + (() if scale_w else ("rows_per_split",))
                specs.append(_spec("lora_mul_dm" + ("" if scale_w else " split"), _lora_mul_dm_kernel, sig,
                                   consts, cfg, dtype, divisible))
    return specs
