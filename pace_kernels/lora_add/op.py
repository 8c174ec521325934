"""Host side of ``lora_add``: the autotuned launches, the ``torch.ops.pace.lora_add_fwd`` /
``lora_add_bwd`` ops and their autograd (docs/design.md section 9.2)."""

from __future__ import annotations

import torch
import triton

from .._triton_utils import (
    NOISE_GATHER,
    NOISE_NONE,
    NOISE_SEGMENTS,
    autotune_for_device,
    contiguous_or_none,
    dot_flags,
    frozen_weight,
    padded_rank,
    register_op,
    wrap_triton,
)
from .configs import (
    _INTERP_DX,
    _INTERP_FWD,
    _INTERP_RANK_GRAD,
    DX_CONFIGS_16,
    DX_CONFIGS_32,
    FWD_CONFIGS_16,
    FWD_CONFIGS_32,
    RANK_GRAD_CONFIGS_16,
    RANK_GRAD_CONFIGS_32,
)
from .kernels import _bwd_dx_kernel, _fwd_kernel, _rank_grad_kernel

MAX_RANK = 64
"""Largest rank the kernels take; larger ranks run the reference path."""


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
    """The two-segment path (``NOISE_SEGMENTS``) is right only while a row tile holds rows of at most two
    samples, i.e. ``BLOCK_M <= T + 1``: refuse a config that breaks it (a future 256-row tile, say)
    rather than mix three samples' noise in one tile."""
    if block_m > rows_per_noise + 1:
        raise RuntimeError(
            f"lora_add: a row tile of BLOCK_M={block_m} rows can span three samples of {rows_per_noise} "
            f"rows, which the two-segment noise path cannot handle; every config's BLOCK_M must be at "
            f"most SEGMENT_MIN_ROWS + 1 = {SEGMENT_MIN_ROWS + 1}")


def _unit_stride(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    # The kernels read every operand row-major (unit stride along the last dimension, the row
    # stride passed; kernels.py): the ops make their inputs so, which costs nothing for the
    # contiguous tensors the public entry point passes.
    return [contiguous_or_none(t) for t in tensors]


def _noise_mode(noise: torch.Tensor | None, rows_per_noise: int, *, folds_db: bool, has_db: bool) -> int:
    """The ``NOISE`` constexpr of a launch (``_triton_utils.NOISE_*``). The segment path needs
    samples of at least :data:`SEGMENT_MIN_ROWS` rows, and a delta bias only when it rides in a
    spare rank slot."""
    if noise is None:
        return NOISE_NONE.value
    if rows_per_noise >= SEGMENT_MIN_ROWS and (folds_db or not has_db):
        return NOISE_SEGMENTS.value
    return NOISE_GATHER.value


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
        lhs.stride(0), z.stride(0), rhs.stride(0), partial.stride(0), partial.stride(1), colsum.stride(0),
        NOISE=(NOISE_NONE if noise is None else NOISE_GATHER).value, HAS_COLSUM=with_colsum,
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
    noise_mode = _noise_mode(noise, rows_per_noise, folds_db=fold_db, has_db=delta_bias is not None)

    def grid(meta):
        if noise_mode == NOISE_SEGMENTS.value:
            check_segment_tile(meta["BLOCK_M"], rows_per_noise)
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

    wrap_triton(kernel)[grid](
        x, weight, bias if bias is not None else x, lora_a, lora_b,
        delta_bias if delta_bias is not None else x, z, y, u,
        n_rows, d_out, k_in, rank, max(rows_per_noise, 1),
        x.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), z.stride(0), y.stride(0),
        u.stride(0),
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
    # The backward never adds db, so nothing keeps it off the segment path.
    noise_mode = _noise_mode(noise, rows_per_noise, folds_db=True, has_db=False)

    def grid(meta):
        if noise_mode == NOISE_SEGMENTS.value:
            check_segment_tile(meta["BLOCK_M"], rows_per_noise)
        # Without dX only P = Gz B is computed: one program per row tile.
        col_tiles = triton.cdiv(k_in, meta["BLOCK_K"]) if need_dx else 1
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * col_tiles,)

    wrap_triton(kernel)[grid](
        g, weight, lora_a, lora_b, z, dx_arg, p,
        n_rows, d_out, k_in, rank, max(rows_per_noise, 1),
        g.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), z.stride(0), dx_arg.stride(0),
        p.stride(0),
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
