"""Host side of ``lora_mul``: the row plan, the autotuned launches, the ``torch.ops.pace.lora_mul_fwd``
/ ``lora_mul_bwd`` ops and their autograd (docs/design.md section 9.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from .._triton_utils import (
    NOISE_GATHER,
    NOISE_NONE,
    NOISE_SAMPLE,
    autotune_for_device,
    contiguous_or_none,
    dot_flags,
    frozen_weight,
    is_interpreting,
    padded_rank,
    register_op,
    wrap_triton,
)
from .configs import (
    _INTERP_CONFIG,
    DM_CONFIGS_16,
    DM_CONFIGS_32,
    PLAIN_CONFIGS_16,
    PLAIN_CONFIGS_32,
    SAMPLE_CONFIGS_16,
    SAMPLE_CONFIGS_32,
    TWO_GEMM_DX_CONFIGS_16,
    TWO_GEMM_DX_CONFIGS_32,
    TWO_GEMM_FACTORS_DX_CONFIGS_16,
    TWO_GEMM_FACTORS_DX_CONFIGS_32,
    TWO_GEMM_FACTORS_FWD_CONFIGS_16,
    TWO_GEMM_FACTORS_FWD_CONFIGS_32,
    TWO_GEMM_FWD_CONFIGS_16,
    TWO_GEMM_FWD_CONFIGS_32,
)
from .kernels import (
    _lora_mul_dm_kernel,
    _lora_mul_dx_kernel,
    _lora_mul_dx_two_gemm_kernel,
    _lora_mul_fwd_kernel,
    _lora_mul_fwd_two_gemm_kernel,
)

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
    for _operand_bits, _table in ((16, SAMPLE_CONFIGS_16), (32, SAMPLE_CONFIGS_32)):
        _by_arch = _table.get(_bm, {90: [_INTERP_CONFIG]})
        _fwd_sample[_operand_bits, _bm] = _tune(_lora_mul_fwd_kernel, _by_arch, _SEG_KEY)
        _dx_sample[_operand_bits, _bm] = _tune(_lora_mul_dx_kernel, _by_arch, _SEG_KEY)
# Keyed by (operand bits, FACTORS): building W0*M in the kernel has config lists of its own.
_fwd_two_gemm = {
    (16, False): _tune(_lora_mul_fwd_two_gemm_kernel, TWO_GEMM_FWD_CONFIGS_16, _ROWS_KEY),
    (32, False): _tune(_lora_mul_fwd_two_gemm_kernel, TWO_GEMM_FWD_CONFIGS_32, _ROWS_KEY),
    (16, True): _tune(_lora_mul_fwd_two_gemm_kernel, TWO_GEMM_FACTORS_FWD_CONFIGS_16, _ROWS_KEY),
    (32, True): _tune(_lora_mul_fwd_two_gemm_kernel, TWO_GEMM_FACTORS_FWD_CONFIGS_32, _ROWS_KEY)}
_dx_two_gemm = {
    (16, False): _tune(_lora_mul_dx_two_gemm_kernel, TWO_GEMM_DX_CONFIGS_16, _ROWS_KEY),
    (32, False): _tune(_lora_mul_dx_two_gemm_kernel, TWO_GEMM_DX_CONFIGS_32, _ROWS_KEY),
    (16, True): _tune(_lora_mul_dx_two_gemm_kernel, TWO_GEMM_FACTORS_DX_CONFIGS_16, _ROWS_KEY),
    (32, True): _tune(_lora_mul_dx_two_gemm_kernel, TWO_GEMM_FACTORS_DX_CONFIGS_32, _ROWS_KEY)}
_dm = {16: _tune(_lora_mul_dm_kernel, DM_CONFIGS_16, ("N", "D", "K")),
       32: _tune(_lora_mul_dm_kernel, DM_CONFIGS_32, ("N", "D", "K"))}


# ------------------------------------------------------------------------------------------------
# Launchers (fake-tensor traceable: torch ops and wrap_triton launches only)


def _kernel_flags(dtype: torch.dtype) -> tuple[int, bool, str]:
    # The autotuners are kept per operand width: fp32 (tf32 dots) and fp16/bf16 have their own lists.
    operand_bits = 32 if dtype == torch.float32 else 16
    return (operand_bits, *dot_flags(dtype))


def _adapter_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    merged: bool) -> torch.Tensor:
    """The call's one transient ``D x K``: ``W0*M`` for the two-GEMM kernels when they do not
    build it (:data:`FACTOR_BUILD_MAX_ROWS`), or the merged ``W0*(1+M)`` for the noise-free GEMM.
    ``M`` and ``W0*M`` are rounded to the operand dtype as the reference rounds them."""
    w = torch.mm(lora_b, lora_a)
    w.mul_(weight)
    if merged:
        w.add_(weight)
    return w


FACTOR_BUILD_MAX_ROWS = 2048
"""Most rows for which the two-GEMM kernels build their ``W0*M`` tiles from the factors (one r-wide
product per row-tile program and K step) instead of reading a ``W0*M`` buffer that ``mm`` and
``mul_`` build first. The build costs ``cdiv(rows, BLOCK_M) * 2 D K R`` more MMA FLOPs; the buffer
costs two launches, a ``D x K`` transient and four ``D x K`` passes of memory traffic. At an H100's
rates the build is cheaper up to about 75 row tiles with 16-bit operands and 25 with fp32's
tf32x3 dots (docs/design.md section 9.3, "The ragged tails"): 2,048 rows takes every ViT tail
(5 rows per sample at T = 197) and short per-token calls; long per-token calls keep the buffer."""


def _tail_adapter(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  tail_rows: int) -> tuple[bool, torch.Tensor]:
    """``(FACTORS, wm operand)`` for the two-GEMM launch over ``tail_rows`` rows: the kernels build
    ``W0*M`` themselves (``wm`` unread, ``weight`` stands in), or read the buffer made here."""
    factors = bool(tail_rows <= FACTOR_BUILD_MAX_ROWS)  # a constexpr: a plain bool under tracing too
    if factors or not tail_rows:
        return factors, weight
    return factors, _adapter_weight(weight, lora_a, lora_b, merged=False)


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


def _launch_rows_kernels(kind: str, operand_bits: int, plan: SamplePlan, n_seg: int, seg_len: int,
                         per_sample_args, two_gemm_args, out_cols: int, consts: dict) -> None:
    """Launch the per-sample kernel over the plan's main rows and the two-GEMM kernel over the
    tails (``kind`` is ``"fwd"`` or ``"dx"``)."""
    if plan.main_rows:
        tuned = (_fwd_sample if kind == "fwd" else _dx_sample)[operand_bits, plan.block_m]

        def grid(meta):
            tiles_per_sample = triton.cdiv(plan.main_rows, meta["BLOCK_M"])
            return (n_seg * tiles_per_sample * triton.cdiv(out_cols, meta["BLOCK_N"]),)

        wrap_triton(tuned)[grid](*per_sample_args, **consts["sample"])
    if plan.tail_rows:
        factors = consts["two_gemm"]["FACTORS"]
        tuned = (_fwd_two_gemm if kind == "fwd" else _dx_two_gemm)[operand_bits, factors]
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
    operand_bits, upcast, precision = _kernel_flags(x.dtype)
    bias_arg = bias if bias is not None else y
    db_arg = delta_bias if delta_bias is not None else y
    flags = dict(HAS_BIAS=bias is not None, HAS_DB=delta_bias is not None, UPCAST=upcast, PRECISION=precision)

    if noise is None:
        w = _adapter_weight(weight, lora_a, lora_b, merged=True)

        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

        wrap_triton(_fwd_plain[operand_bits])[grid](
            x, w, w, w, y, bias_arg, db_arg, y,
            d_out, k_in, rank, 1, n_rows, n_rows,
            x.stride(0), w.stride(0), 0, 0, 0, y.stride(0),
            NOISE=NOISE_NONE.value, R=16, **flags,
        )
        return y

    seg_len = rows_per_noise
    n_seg = n_rows // seg_len
    plan = sample_plan(seg_len, SAMPLE_BLOCK_MS)
    tail_rows = n_seg * plan.tail_rows
    factors, wm = _tail_adapter(weight, lora_a, lora_b, tail_rows)
    _launch_rows_kernels(
        "fwd", operand_bits, plan, n_seg, seg_len,
        (x, weight, lora_a, lora_b, noise, bias_arg, db_arg, y,
         d_out, k_in, rank, n_seg, seg_len, plan.main_rows,
         x.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), noise.stride(0), y.stride(0)),
        (x, weight, wm, lora_a, lora_b, noise, bias_arg, db_arg, y,
         d_out, k_in, rank, tail_rows, plan.tail_rows, seg_len, seg_len - plan.tail_rows, seg_len,
         x.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), noise.stride(0), y.stride(0)),
        d_out,
        dict(sample=dict(NOISE=NOISE_SAMPLE.value, R=padded_rank(rank), **flags),
             two_gemm=dict(FACTORS=factors, R=padded_rank(rank), **flags)),
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
                   need_factors: bool, need_db: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Four explicit tensors, not tuple[Tensor, ...]: torch 2.11's triton_op infers the schema from
    # these hints (ignoring schema=) and refuses a variadic tuple, which broke the import on GPUs.
    g, x, lora_a, lora_b, noise = _unit_stride(grad_y, x, lora_a, lora_b, noise)
    weight = frozen_weight(weight, x.dtype)
    n_rows, k_in = x.shape
    d_out, rank = lora_b.shape
    operand_bits, upcast, precision = _kernel_flags(x.dtype)
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

        wrap_triton(_dm[operand_bits])[grid_dm](
            g, x, z, weight, dm, db32,
            n_rows, d_out, k_in, max(rows_per_noise, 1), rows_per_split,
            g.stride(0), x.stride(0), z.stride(0), weight.stride(0), dm.stride(0), dm.stride(1),
            db32.stride(0),
            NOISE=(NOISE_NONE if noise is None else NOISE_GATHER).value, HAS_DB=need_db, SCALE_W=splits == 1,
            UPCAST=upcast, PRECISION=precision,
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

            wrap_triton(_dx_plain[operand_bits])[grid](
                g, w, w, w, g, dx,
                d_out, k_in, rank, 1, n_rows, n_rows,
                g.stride(0), w.stride(0), 0, 0, 0, dx.stride(0),
                NOISE=NOISE_NONE.value, R=16, **consts,
            )
        else:
            seg_len = rows_per_noise
            n_seg = n_rows // seg_len
            plan = sample_plan(seg_len, SAMPLE_BLOCK_MS)
            tail_rows = n_seg * plan.tail_rows
            factors, wm = _tail_adapter(weight, lora_a, lora_b, tail_rows)
            _launch_rows_kernels(
                "dx", operand_bits, plan, n_seg, seg_len,
                (g, weight, lora_a, lora_b, noise, dx,
                 d_out, k_in, rank, n_seg, seg_len, plan.main_rows,
                 g.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), noise.stride(0),
                 dx.stride(0)),
                (g, weight, wm, lora_a, lora_b, noise, dx,
                 d_out, k_in, rank, tail_rows, plan.tail_rows, seg_len, seg_len - plan.tail_rows, seg_len,
                 g.stride(0), weight.stride(0), lora_a.stride(0), lora_b.stride(0), noise.stride(0),
                 dx.stride(0)),
                k_in,
                dict(sample=dict(NOISE=NOISE_SAMPLE.value, R=padded_rank(rank), **consts),
                     two_gemm=dict(FACTORS=factors, R=padded_rank(rank), **consts)),
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
