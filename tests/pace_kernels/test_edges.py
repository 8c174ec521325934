"""Edges of the fused ops (issue 10, item 5): zero-width inputs, the registered ops on
non-contiguous tensors, their fake kernels, 64-bit weight offsets and the two-segment tile rule of
``lora_add``. Shapes stay small: without a GPU the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
import triton

import pace_kernels
from pace_kernels import lora_add, lora_mul, reference
from tests.pace_kernels import _cases

OPS = ("lora_add_linear", "lora_mul_linear")


def _inputs(
    samples: int,
    tokens: int,
    k_in: int,
    d_out: int,
    rank: int,
    noise: str | None,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> _cases.Inputs:
    """Leaves of one call ``x [B, T, K]`` with bias and delta bias; unlike ``_cases.make_inputs``
    any size may be 0."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    z_shape = (samples, d_out) if noise == "sample" else (samples, tokens, d_out)
    return dict(
        x=rnd(samples, tokens, k_in).requires_grad_(),
        weight=rnd(d_out, k_in, scale=max(k_in, 1) ** -0.5),
        bias=rnd(d_out, scale=0.5),
        lora_a=rnd(rank, k_in, scale=max(k_in, 1) ** -0.5).requires_grad_(),
        lora_b=rnd(d_out, rank, scale=rank**-0.5).requires_grad_(),
        delta_bias=rnd(d_out, scale=0.5).requires_grad_(),
        noise=None if noise is None else (1 + 0.5 * torch.randn(*z_shape, generator=g)).to(device),
        grad=rnd(samples, tokens, d_out),
    )


def _assert_matches_reference(op: str, inputs: _cases.Inputs, label: str) -> None:
    """``_cases.assert_matches_reference``'s criterion, for outputs and gradients that may be empty."""
    y_k, g_k = _cases.forward_backward(op, inputs, "triton")
    y_r, g_r = _cases.forward_backward(op, inputs, "torch")
    y_64, g_64 = _cases.forward_backward(op, inputs, "reference", torch.float64)
    assert set(g_k) == set(g_r) == set(g_64)
    dtype = inputs["x"].dtype
    for name, got, ref, exact in [("y", y_k, y_r, y_64)] + [(n, g_k[n], g_r[n], g_64[n]) for n in g_64]:
        assert got.shape == exact.shape and got.dtype == ref.dtype == dtype, f"{label} {name}"
        if exact.numel() == 0:
            continue
        scale = exact.abs().max().item() + 1e-12
        err_kernel = (got.double() - exact).abs().max().item()
        err_ref = (ref.double() - exact).abs().max().item()
        allowed = 2 * err_ref + _cases.FLOOR[dtype] * scale
        assert err_kernel <= allowed, f"{label} {name}: kernel error {err_kernel:.3g} > allowed {allowed:.3g}"


# --------------------------------------------------------------------------------------------
# K = 0, N = 0, small D


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("noise", ["sample", "token", None])
def test_zero_in_features_is_bias_plus_noisy_delta_bias(op: str, noise: str | None, device: str) -> None:
    """``in_features == 0``: ``Y = b0 + z * db`` on every backend, gradients included (dX and dA
    empty, dB zero, d db = colsum(Gz))."""
    inputs = _inputs(2, 3, 0, 5, 2, noise, torch.float32, device)
    y, grads = _cases.forward_backward(op, inputs, "triton")
    z = 1 if noise is None else (inputs["noise"][:, None] if noise == "sample" else inputs["noise"])
    want = inputs["bias"] + z * inputs["delta_bias"].detach()
    torch.testing.assert_close(y, want.expand_as(y))
    assert grads["x"].shape == (2, 3, 0) and grads["lora_a"].shape == (2, 0)
    assert torch.equal(grads["lora_b"], torch.zeros(5, 2, device=device))
    torch.testing.assert_close(grads["delta_bias"], (inputs["grad"] * z).sum((0, 1)))
    _assert_matches_reference(op, inputs, f"K=0 {noise}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "shape",
    [
        (0, 3, 0, 5, 2, "sample"),  # no rows and no input features
        (0, 197, 7, 4, 3, "sample"),  # no rows
        (2, 197, 7, 1, 1, "sample"),  # D = 1, per-sample tiles and the two-segment lora_add path
        (3, 4, 5, 2, 18, "token"),  # D = 2, rank above D and K
        (2, 130, 3, 3, 10, "sample"),  # K = 3
        (5, 1, 1, 1, 1, None),  # one of everything
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_and_empty_shapes_match_reference(
    op: str, shape: tuple, dtype: torch.dtype, device: str
) -> None:
    samples, tokens, k_in, d_out, rank, noise = shape
    inputs = _inputs(samples, tokens, k_in, d_out, rank, noise, dtype, device)
    _assert_matches_reference(op, inputs, f"{shape} {dtype}")


# --------------------------------------------------------------------------------------------
# The registered ops on non-contiguous tensors


def _strided(t: torch.Tensor | None, how: str) -> torch.Tensor | None:
    """The same values as ``t`` in a non-contiguous layout: ``"t"`` a transposed view of a
    transposed copy, ``"step"`` every other element of the last dimension of a wider tensor."""
    if t is None:
        return None
    if how == "t" and t.ndim == 2:
        out = t.detach().t().contiguous().t()
    else:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=t.dtype)
        wide[..., ::2] = t.detach()
        out = wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t.detach())
    return out


def _op_inputs(device: str, n: int = 10, k: int = 20, d: int = 24, r: int = 3, samples: int = 2):
    x, w, bias, a, lb, db, z = _cases.opcheck_inputs(device, n, k, d, r)
    return [t.detach() for t in (x, w, bias, a, lb, db, z)]


def _noncontiguous(args: list, layouts: tuple[str, ...]) -> list:
    return [_strided(t, how) if isinstance(t, torch.Tensor) else t for t, how in zip(args, layouts)]


@pytest.mark.parametrize("op", ["lora_add_fwd", "lora_mul_fwd"])
@pytest.mark.parametrize("layout", ["t", "step"])
def test_forward_ops_take_non_contiguous_inputs(op: str, layout: str, device: str) -> None:
    """``torch.ops.pace.*_fwd`` on transposed / stride-2 operands (weight, bias, factors, delta
    bias, noise, x): the same bits as on contiguous copies, and the reference's numbers."""
    args = _op_inputs(device) + [5]
    bad = _noncontiguous(args, (layout,) * 7 + ("",))
    fn = getattr(torch.ops.pace, op)
    want, got = fn(*args), fn(*bad)
    want, got = (want[0], got[0]) if isinstance(want, (tuple, list)) else (want, got)
    assert torch.equal(got, want)
    x, w, bias, a, lb, db, z = args[:7]
    exact = getattr(reference, op.replace("_fwd", "_linear"))(
        x, w, bias, a, lb, db, z.repeat_interleave(5, 0)
    )
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["lora_add_bwd", "lora_mul_bwd"])
@pytest.mark.parametrize("layout", ["t", "step"])
def test_backward_ops_take_non_contiguous_inputs(op: str, layout: str, device: str) -> None:
    """``torch.ops.pace.*_bwd`` on transposed / stride-2 operands: the contiguous call's results."""
    x, w, bias, a, lb, db, z = _op_inputs(device)
    g = torch.randn(x.shape[0], w.shape[0], device=device)
    if op == "lora_add_bwd":
        _, u = torch.ops.pace.lora_add_fwd(x, w, bias, a, lb, db, z, 5)
        args = [g, x, u, w, a, lb, z, 5, True]
    else:
        args = [g, x, w, a, lb, z, 5, True, True, True]
    bad = _noncontiguous(args, tuple(layout if isinstance(t, torch.Tensor) else "" for t in args))
    fn = getattr(torch.ops.pace, op)
    for want, got in zip(fn(*args), fn(*bad)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["t", "step"])
def test_opcheck_every_op_with_non_contiguous_inputs(layout: str, device: str) -> None:
    """``torch.library.opcheck`` (schema, fake kernels and their strides, autograd registration,
    AOT dispatch) on all four ops with non-contiguous inputs."""
    x, w, bias, a, lb, db, z = _op_inputs(device)
    g = torch.randn(x.shape[0], w.shape[0], device=device)
    _, u = torch.ops.pace.lora_add_fwd(x, w, bias, a, lb, db, z, 5)

    def strided(*ts):
        return [_strided(t, layout) for t in ts]

    xs, ws, bs, as_, lbs, dbs, zs, gs, us = strided(x, w, bias, a, lb, db, z, g, u)
    xs, as_, lbs, dbs = (t.requires_grad_() for t in (xs, as_, lbs, dbs))
    for op in (torch.ops.pace.lora_add_fwd, torch.ops.pace.lora_mul_fwd):
        torch.library.opcheck(op.default, (xs, ws, bs, as_, lbs, dbs, zs, 5))
    xd, ad, lbd = (t.detach() for t in (xs, as_, lbs))
    torch.library.opcheck(torch.ops.pace.lora_add_bwd.default, (gs, xd, us, ws, ad, lbd, zs, 5, True))
    torch.library.opcheck(torch.ops.pace.lora_mul_bwd.default, (gs, xd, ws, ad, lbd, zs, 5, True, True, True))


# --------------------------------------------------------------------------------------------
# 64-bit weight offsets


def _far_apart_rows(d_out: int, k_in: int, device: str) -> torch.Tensor | None:
    """A ``[d_out, k_in]`` fp16 view whose rows lie ``1.5 * 2^30`` elements apart, so row 2 starts
    past element 2^31 of its storage, and an int32-wrapped offset of row 2 lands on element 0 (the
    zeros there make a wrapped read visible). The storage (8 GiB) is allocated, never touched but
    for the rows read: None where the allocator refuses it."""
    row_stride = 3 * 2**29  # fits int32; 2 * row_stride does not
    first = 2**32 - 2 * row_stride  # row 2 wrapped to int32 is element 0
    try:
        storage = torch.empty(first + (d_out - 1) * row_stride + k_in, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):
        return None
    storage[:k_in].zero_()
    weight = torch.as_strided(storage, (d_out, k_in), (row_stride, 1), first)
    weight.copy_(torch.randn(d_out, k_in, device=device) * k_in**-0.5)
    return weight


@pytest.mark.parametrize("module", [lora_add, lora_mul], ids=["lora_add", "lora_mul"])
def test_weight_offsets_past_2_to_31_elements(module, device: str, monkeypatch) -> None:
    """The kernels form the weight's column offsets (``cols * stride_wd``, up to ``D * K``) in
    int64: a weight whose rows lie past element 2^31 (here through its row stride, as in a weight
    of more than 2^31 elements) is read where it is. The op makes weights contiguous, so the
    kernels get the strided view through the launchers with that step switched off (and, for
    ``lora_mul``, samples of a whole tile: its two-GEMM tail reads a transient ``W0*M`` with the
    weight's strides). ``lora_add``'s dX kernel is left out: with the row-major weight the op
    passes, its tile offsets stay below ``BLOCK_D * K`` and the loop advances 64-bit pointers."""
    d_out, k_in, rank = 3, 24, 4
    tokens = 5 if module is lora_add else 64
    n_rows = 2 * tokens
    weight = _far_apart_rows(d_out, k_in, device)
    if weight is None:
        pytest.skip("cannot reserve 8 GiB of address space here")
    monkeypatch.setattr(module.op, "frozen_weight", lambda w, dtype: w)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.float16)

    x, a, b = rnd(n_rows, k_in), rnd(rank, k_in) * k_in**-0.5, rnd(d_out, rank) * 0.5
    noise = (1 + 0.5 * torch.randn(2, d_out, generator=g)).to(device)
    grad = rnd(n_rows, d_out)
    leaves = [t.double().requires_grad_() for t in (x, a, b)]
    z_rows = noise.double().repeat_interleave(tokens, 0)
    if module is lora_add:
        y, _ = module.op._forward_impl(x, weight, None, a, b, None, noise, tokens)
        want = reference.lora_add_linear(leaves[0], weight.double(), None, leaves[1], leaves[2], None, z_rows)
        results = [("y", y, want)]
    else:
        assert module.sample_plan(tokens, module.SAMPLE_BLOCK_MS).tail_rows == 0
        y = module.op._forward_impl(x, weight, None, a, b, None, noise, tokens)
        grads = module.op._backward_impl(grad, x, weight, a, b, noise, tokens, True, True, False)[:3]
        want = reference.lora_mul_linear(leaves[0], weight.double(), None, leaves[1], leaves[2], None, z_rows)
        want_grads = torch.autograd.grad(want, leaves, grad.double())
        results = [("y", y, want)] + list(zip(("dx", "d_lora_a", "d_lora_b"), grads, want_grads))
    for name, got, exact in results:
        err = (got.double() - exact).abs().max().item()
        assert err <= 2e-2 * exact.abs().max().item(), f"{name}: error {err:.3g}"


# --------------------------------------------------------------------------------------------
# The two-segment lora_add path: at most two samples per row tile


def test_two_segment_path_refuses_tiles_taller_than_a_sample_plus_one(device: str, monkeypatch) -> None:
    """A row tile of BLOCK_M rows holds at most two samples of T rows while BLOCK_M <= T + 1; a
    config past that is refused before launch, with a message, not run into wrong numbers."""
    tokens = lora_add.SEGMENT_MIN_ROWS  # the shortest samples that take the two-segment path
    inputs = _inputs(3, tokens, 8, 16, 2, "sample", torch.float32, device)
    args = [inputs[n] for n in _cases.ARGS]
    y_ok = pace_kernels.lora_add_linear(*args, backend="triton")
    torch.testing.assert_close(y_ok, reference.lora_add_linear(*args), rtol=1e-4, atol=1e-4)

    tall = triton.Config(
        {"BLOCK_M": 2 * tokens, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=1
    )
    tall_dx = triton.Config(
        {"BLOCK_M": 2 * tokens, "BLOCK_K": 16, "BLOCK_D": 16, "GROUP_M": 8}, num_warps=4, num_stages=1
    )
    monkeypatch.setattr(lora_add.op._fwd_32, "configs", [tall])
    with pytest.raises(RuntimeError, match=r"BLOCK_M=256 rows can span three samples of 128 rows"):
        pace_kernels.lora_add_linear(*args, backend="triton")
    monkeypatch.undo()

    y = pace_kernels.lora_add_linear(*args, backend="triton")
    monkeypatch.setattr(lora_add.op._dx_32, "configs", [tall_dx])
    with pytest.raises(RuntimeError, match="two-segment noise path"):
        y.backward(inputs["grad"])


def test_shipped_configs_keep_two_samples_per_tile() -> None:
    """Every shipped forward and dX config satisfies the two-segment rule at the shortest samples
    that take that path."""
    tables = (
        lora_add.FWD_CONFIGS_16, lora_add.FWD_CONFIGS_32, lora_add.DX_CONFIGS_16, lora_add.DX_CONFIGS_32
    )
    configs = [cfg for per_arch in tables for arch_configs in per_arch.values() for cfg in arch_configs]
    assert configs
    for cfg in configs:
        lora_add.check_segment_tile(cfg.kwargs["BLOCK_M"], lora_add.SEGMENT_MIN_ROWS)


@pytest.mark.parametrize("op", ["lora_add_bwd", "lora_mul_bwd"])
def test_backward_fills_nothing(op: str, device: str) -> None:
    """Issue 11 item 9: every gradient the backward op returns is written whole by a kernel or a
    GEMM, so nothing is allocated with zeros and then replaced (144 fills per ViT-B step before)."""
    x, w, bias, a, lb, db, z = _op_inputs(device)
    g = torch.randn(x.shape[0], w.shape[0], device=device)
    if op == "lora_add_bwd":
        _, u = torch.ops.pace.lora_add_fwd(x, w, bias, a, lb, db, z, 5)
        args = [g, x, u, w, a, lb, z, 5, True]
    else:
        args = [g, x, w, a, lb, z, 5, True, True, True]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        getattr(torch.ops.pace, op)(*args)
    # (aten::fill_ is left out: a CPU sum reduction initialises its output with it.)
    fills = [e.name for e in prof.events()
             if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_", "aten::new_zeros")]
    assert fills == [], fills


@pytest.mark.parametrize("module", ["lora_add", "lora_mul"])
def test_op_bodies_have_hints_torch_can_read(module: str) -> None:
    """torch 2.11's ``triton_op`` (the GPU machines' stack) ignores ``schema=`` and infers the schema
    from the bodies' type hints; a variadic ``tuple[Tensor, ...]`` made ``import pace_kernels`` fail
    there outside the interpreter."""
    import importlib

    op = importlib.import_module(f"pace_kernels.{module}.op")
    for fn in (op._forward_impl, op._backward_impl):
        torch.library.infer_schema(fn, mutates_args=())


def test_kernels_share_one_tile_order_and_one_noise_vocabulary() -> None:
    """Issue 11 item 5 (docs/design.md section 9.1): both families order their tiles with the one
    ``grouped_tile`` and choose their noise variant with one ``NOISE`` constexpr whose values are the
    shared ``NOISE_*`` names (no ``PER_SAMPLE`` / ``HAS_Z`` / ``HAS_NOISE`` flags of their own)."""
    from pace_kernels import _triton_utils
    from pace_kernels.lora_add import kernels as add_kernels
    from pace_kernels.lora_add import op as add_op
    from pace_kernels.lora_mul import kernels as mul_kernels

    assert add_kernels.grouped_tile is mul_kernels.grouped_tile is _triton_utils.grouped_tile
    assert not hasattr(add_kernels, "_tile_ids")
    kernels = {name: getattr(m, name) for m in (add_kernels, mul_kernels) for name in dir(m)
               if isinstance(getattr(m, name), triton.runtime.KernelInterface) and name.endswith("_kernel")}
    with_noise = {name for name, kernel in kernels.items() if "NOISE" in kernel.arg_names}
    assert with_noise == {"_fwd_kernel", "_bwd_dx_kernel", "_rank_grad_kernel", "_lora_mul_fwd_kernel",
                          "_lora_mul_dx_kernel", "_lora_mul_dm_kernel"}
    for name, kernel in kernels.items():
        assert not {"PER_SAMPLE", "HAS_Z", "HAS_NOISE"} & set(kernel.arg_names), name
    modes = {_triton_utils.NOISE_NONE.value, _triton_utils.NOISE_GATHER.value,
             _triton_utils.NOISE_SEGMENTS.value, _triton_utils.NOISE_SAMPLE.value}
    assert len(modes) == 4
    z = torch.ones(1)
    assert add_op._noise_mode(None, 200, folds_db=True, has_db=True) == _triton_utils.NOISE_NONE.value
    assert add_op._noise_mode(z, 200, folds_db=True, has_db=True) == _triton_utils.NOISE_SEGMENTS.value
    assert add_op._noise_mode(z, 5, folds_db=True, has_db=True) == _triton_utils.NOISE_GATHER.value
