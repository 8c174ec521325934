"""The fused ``lora_mul`` kernels (and RLRR, rank-1 ``lora_mul``) against the reference path
(docs/design.md sections 2, 3 and 4).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), which is slow: shapes are
small, and the case list covers every pair of axis values (dtype, T, D, K, rank, noise kind, bias,
delta bias, x rank, contiguity) instead of their product. T = 197 and 50 exercise the three row
plans of per-sample noise in the interpreter's 64-row tiles (197: three full tiles plus a 5-row tail
in the two-GEMM kernel; 50: a masked tile; 1: two-GEMM only) and, without noise or with per-token
noise, row tiles that straddle samples. On a CUDA machine the same tests run on the GPU, plus the
real-size cases at the end.

The accuracy criterion is in tests/pace_kernels/_cases.py.
"""

from __future__ import annotations

import math
import os
import re
import time
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pace_kernels
from pace_kernels import lora_mul
from tests.pace_kernels import _cases
from tests.pace_kernels._cases import ARGS, GRAD_NAMES, Case, cuda_only

OP = "lora_mul_linear"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
forward_backward = partial(_cases.forward_backward, OP)
assert_matches_reference = partial(_cases.assert_matches_reference, OP)

# Every pair of values of any two axes occurs in at least one case (16 cases, not 7776).
PAIRWISE = [
    Case("fp32", 50, 17, 70, 18, "token", True, True, 2, True),
    Case("fp16", 1, 130, 48, 1, None, False, False, 2, False),
    Case("bf16", 197, 80, 33, 10, "sample", True, False, 3, False),
    Case("bf16", 1, 130, 70, 2, "sample", False, True, 3, True),
    Case("fp16", 50, 17, 33, 2, "token", False, False, 3, False, noise_dtype=torch.float16),
    Case("fp32", 197, 80, 33, 1, None, False, True, 2, True),
    Case("fp16", 1, 80, 48, 10, "token", True, True, 2, True),
    Case("bf16", 197, 17, 48, 18, "sample", False, True, 2, False),
    Case("fp32", 50, 130, 70, 10, None, True, False, 3, False),
    Case("bf16", 50, 17, 48, 1, "sample", True, False, 3, True, noise_dtype=torch.bfloat16),
    Case("bf16", 1, 130, 33, 18, None, True, False, 3, True),
    Case("fp16", 197, 80, 70, 2, "sample", True, False, 2, True),
    Case("bf16", 197, 130, 70, 1, "token", False, False, 2, False),
    Case("fp32", 1, 17, 48, 2, None, False, True, 2, True),
    Case("fp16", 50, 80, 33, 18, "token", True, True, 3, False),
    Case("fp32", 50, 17, 48, 10, "sample", False, True, 3, False, noise_dtype=torch.float64),
]


def make_inputs(case: Case, device: str, seed: int = 0) -> _cases.Inputs:
    """:func:`_cases.make_inputs` with ``A, B ~ r^-1/4``: ``B A`` is O(1), so the multiplicative
    adapter is as large as the frozen path and its errors are visible."""
    scale = case.rank ** -0.25
    return _cases.make_inputs(case, device, seed, a_scale=scale, b_scale=scale)


@pytest.mark.parametrize("case", PAIRWISE, ids=str)
def test_matches_reference(case: Case, device: str) -> None:
    assert_matches_reference(make_inputs(case, device), str(case))


def test_pairwise_cases_cover_every_value() -> None:
    axes = dict(dtype={"fp32", "fp16", "bf16"}, tokens={197, 50, 1}, d_out={17, 80, 130}, k_in={33, 48, 70},
                rank={1, 2, 10, 18}, noise={"sample", "token", None}, bias={True, False},
                delta_bias={True, False}, x_ndim={2, 3}, contiguous={True, False})
    _cases.assert_pairwise_coverage(PAIRWISE, axes)


@pytest.mark.parametrize("tokens", [64, 40, 10])
def test_row_plans(tokens: int, device: str) -> None:
    """Per-sample noise where T is a whole number of tiles, leaves a masked tile, or is all tail."""
    case = Case("fp32", tokens, 40, 24, 3, "sample", True, True, 3, True, samples=3)
    assert_matches_reference(make_inputs(case, device, seed=tokens), str(case))


def test_strided_bias_and_delta_bias(device: str) -> None:
    """1-D ``bias`` and ``delta_bias`` with stride 2 (views such as ``t[::2]``) give the right output
    and ``delta_bias`` gradient: the kernels read them with unit stride, so the launcher must make
    them contiguous."""
    case = Case("fp32", 50, 80, 48, 10, "sample", True, True, 3, True)
    assert_matches_reference(_cases.with_strided_biases(make_inputs(case, device)), "strided biases")


def test_partial_gradients(device: str) -> None:
    """x without requires_grad (the first adapted layer), and an adapter whose factors are frozen
    (only d db wanted): each asked-for gradient is right."""
    case = Case("fp16", 50, 80, 48, 10, "sample", True, True, 3, True)
    inputs = make_inputs(case, device)
    inputs["x"] = inputs["x"].detach()
    assert_matches_reference(inputs, "frozen x")
    inputs = make_inputs(case, device)
    inputs["lora_a"] = inputs["lora_a"].detach()
    inputs["lora_b"] = inputs["lora_b"].detach()
    assert_matches_reference(inputs, "frozen factors")


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    samples=st.integers(1, 3),
    tokens=st.integers(1, 70),
    k_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    rank=st.integers(1, 20),
    noise=st.sampled_from(["sample", "token", None]),
    dtype=st.sampled_from(["fp32", "fp16"]),
    bias=st.booleans(),
)
def test_property_random_shapes(samples, tokens, k_in, d_out, rank, noise, dtype, bias) -> None:
    from tests.conftest import DEVICE

    case = Case(dtype, tokens, d_out, k_in, rank, noise, bias, not bias, 3, True, samples=samples)
    assert_matches_reference(make_inputs(case, DEVICE, seed=samples * 1000 + tokens), str(case))


def test_gradients_bitwise_deterministic(device: str) -> None:
    """Two backward passes give identical bits (every output element has one owner, no atomics)."""
    for noise in ("sample", "token"):
        case = Case("fp16", 197, 80, 70, 10, noise, True, True, 3, True)
        inputs = make_inputs(case, device)
        _, first = forward_backward(inputs, "triton")
        _, second = forward_backward(inputs, "triton")
        for name in GRAD_NAMES:
            assert torch.equal(first[name], second[name]), (noise, name)


@pytest.mark.parametrize("shape,want", [
    ((2 * 64 * 197, 768, 768), 8),     # ViT-B proj: 36 tiles of 128 x 128
    ((2 * 64 * 197, 2304, 768), 3),    # qkv: 108 tiles
    ((2 * 64 * 197, 3072, 768), 2),    # fc1: 144 tiles
    ((2 * 8 * 197, 768, 768), 3),      # few rows: >= 1024 rows per split caps S
    ((1000, 768, 768), 1),
    ((8 * 2048, 4096, 4096), 1),       # 1024 tiles fill the GPU alone
])
def test_dm_splits(shape: tuple[int, int, int], want: int) -> None:
    """S from the shapes: tiles x S near 2 x 132 programs, >= 1024 rows per split, whole 128-row
    multiples; the splits cover the rows exactly once."""
    n_rows, d_out, k_in = shape
    splits, rows = lora_mul.dm_splits(n_rows, d_out, k_in)
    assert splits == want
    if splits > 1:
        assert rows % 128 == 0 and rows >= lora_mul.op.DM_SPLIT_MIN_ROWS
        assert (splits - 1) * rows < n_rows <= splits * rows
    else:
        assert rows == n_rows


@pytest.mark.parametrize("noise", ["sample", "token"])
def test_split_dm_matches_reference_and_is_deterministic(noise: str, device: str, monkeypatch) -> None:
    """The dM reduction split over rows (forced here with 128-row splits: 591 rows -> 3 splits,
    the last one short) matches the reference, gives the same bits twice, and agrees with the
    unsplit pass to rounding."""
    case = Case("fp32", 197, 80, 70, 10, noise, True, True, 3, True)
    inputs = make_inputs(case, device)
    _, unsplit = forward_backward(inputs, "triton")
    monkeypatch.setattr(lora_mul.op, "DM_SPLIT_MIN_ROWS", 128)
    assert lora_mul.dm_splits(591, 80, 70) == (3, 256)
    assert_matches_reference(inputs, f"split dM, {noise} noise")
    _, first = forward_backward(inputs, "triton")
    _, second = forward_backward(inputs, "triton")
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name
        torch.testing.assert_close(first[name], unsplit[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("noise", ["sample", "token", None])
def test_memory_contract(noise: str | None, device: str) -> None:
    """Saved for backward: only the op's inputs (x, W0 itself, the factors, the noise), never a
    ``D x K`` tensor of its own nor an ``N x D`` one (docs/design.md section 3, issue 5 item 4)."""
    case = Case("fp32", 50, 24, 40, 3, noise, True, True, 3, True)  # N = 150, D = 24, K = 40
    inputs = make_inputs(case, device)
    n_rows = case.samples * case.tokens
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pace_kernels.lora_mul_linear(*(inputs[n] for n in ARGS), backend="triton")
    y.backward(inputs["grad"])

    inputs_by_ptr = {inputs[n].data_ptr(): n for n in ("x", "weight", "lora_a", "lora_b", "noise")
                     if inputs[n] is not None}
    assert saved, "nothing saved: the op's autograd is not the fused one"
    for t in saved:
        origin = inputs_by_ptr.get(t.data_ptr())
        assert origin is not None, f"saved a tensor of its own: shape {tuple(t.shape)}"
        if tuple(t.shape) == (case.d_out, case.k_in):
            assert origin == "weight"
        if t.numel() == n_rows * case.d_out:
            assert origin == "noise" and noise == "token"  # per-token noise is an input of that size


def test_rlrr_is_rank_one_lora_mul(device: str) -> None:
    """RLRR (docs/design.md section 2): ``W = W0 * (1 + s_left s_right^T)``, ``db = shift``, through the
    kernels as rank-1 lora_mul, against the formula written out, with per-sample noise."""
    g = torch.Generator().manual_seed(3)
    b, t, k, d = 3, 50, 48, 80
    x = torch.randn(b, t, k, generator=g).to(device).requires_grad_()
    w0, b0 = torch.randn(d, k, generator=g).to(device) / k ** 0.5, torch.randn(d, generator=g).to(device)
    s_left = torch.randn(d, 1, generator=g).to(device).requires_grad_()
    s_right = torch.randn(1, k, generator=g).to(device).requires_grad_()
    shift = torch.randn(d, generator=g).to(device).requires_grad_()
    z = 1 + 0.5 * torch.randn(b, d, generator=g).to(device)

    y = pace_kernels.lora_mul_linear(x, w0, b0, s_right, s_left, shift, z, backend="triton")
    dw = w0 * (s_left * s_right)  # W0 * (s_left s_right^T)
    y_ref = x @ w0.t() + b0 + z[:, None, :] * (x @ dw.t() + shift)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    leaves = [x, s_left, s_right, shift]
    for got, want in zip(torch.autograd.grad(y.square().sum(), leaves),
                         torch.autograd.grad(y_ref.square().sum(), leaves)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_pace_linear_rlrr_and_lora_mul_vpt_add_use_the_kernels(device: str) -> None:
    """PaceLinear kinds rlrr and lora_mul_vpt_add (VPT and bias-scale terms of db by autograd)."""
    from pace import PaceLinear

    for kind in ("rlrr", "lora_mul_vpt_add"):
        torch.manual_seed(0)
        layer = PaceLinear(48, 80, adapter=kind, rank=4, sigma=0.5, backend="triton", device=device).train()
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
        x = torch.randn(3, 50, 48, device=device)
        out = {}
        for backend in ("triton", "torch"):
            layer.backend = backend
            torch.manual_seed(1)  # the same noise draw
            y = layer(x)
            params = [p for p in layer.parameters() if p.requires_grad]
            out[backend] = (y.detach(), torch.autograd.grad(y.square().mean(), params))
        torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-4)
        for a, b in zip(out["triton"][1], out["torch"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sample_plan_rule_and_design_doc_counts() -> None:
    """The row-tile rule and the wasted-work table of docs/design.md section 9.3, recounted here."""

    def straddle(t: int, bm: int, samples: int = 64) -> float:
        n = samples * t
        dots = sum((min(r0 + bm, n) - 1) // t - r0 // t + 1 for r0 in range(0, n, bm))
        return dots * bm / n

    table = {}
    for t in (197, 50, 2048, 1):
        plan = lora_mul.sample_plan(t, (128, 64))
        masked = {bm: math.ceil(t / bm) * bm / t for bm in (64, 128)}
        # The plan never costs more than masked tiles or the two-GEMM form.
        assert plan.cost_rows <= min(min(masked.values()) * t, 2 * t)
        assert plan.main_rows + plan.tail_rows == t or (plan.tail_rows == 0 and plan.main_rows == t)
        table[t] = (round(masked[64], 3), round(masked[128], 3), round(straddle(t, 64), 3),
                    round(straddle(t, 128), 3), plan.block_m, round(plan.cost_rows / t, 3))
    assert table[197] == (1.299, 1.299, 1.32, 1.645, 64, 1.025)
    assert table[50] == (1.28, 2.56, 2.24, 3.52, 64, 1.28)
    assert table[2048] == (1.0, 1.0, 1.0, 1.0, 128, 1.0)
    assert table[1][4:] == (128, 2.0) and lora_mul.sample_plan(1, (128, 64)).main_rows == 0
    assert lora_mul.sample_plan(197, (128, 64)) == lora_mul.SamplePlan(64, 192, 5, 202)
    with open(os.path.join(REPO, "docs", "design.md")) as f:
        doc = f.read()
    assert re.search(r"197\s+1\.299 \(23%\)\s+1\.299\s+1\.320 \(24%\)\s+1\.645 \(39%\)", doc)
    assert "bm 64, 1.025 (2.4%) 3.05" in doc and "bm 64, 1.280 (22%)  3.56" in doc


def test_sample_config_tables_match_their_tile_height() -> None:
    """The plan picks a tile height, then the autotuner of that height: its configs must have it."""
    for table in (lora_mul.SAMPLE_CONFIGS_16, lora_mul.SAMPLE_CONFIGS_32):
        assert set(table) == {128, 64}
        for bm, by_arch in table.items():
            for arch, configs in by_arch.items():
                assert configs and all(c.kwargs["BLOCK_M"] == bm for c in configs), (bm, arch)


def test_compile_specs_cover_every_kernel_and_argument() -> None:
    """compile_check compiles what launches run: every kernel, every config list, every argument
    typed (the compiling itself runs in ``python -m pace_kernels.compile_check``)."""
    from pace_kernels.compile_check import lora_mul_specs

    specs = lora_mul_specs.compile_specs()
    m = lora_mul.kernels
    kernels = {m._lora_mul_fwd_kernel, m._lora_mul_fwd_two_gemm_kernel, m._lora_mul_dx_kernel,
               m._lora_mul_dx_two_gemm_kernel, m._lora_mul_dm_kernel}
    assert {s.fn for s in specs} == kernels
    assert {s.dtype for s in specs} == {torch.float16, torch.bfloat16, torch.float32}
    shipped = sum(len(by_arch[90]) for by_arch in lora_mul.SAMPLE_CONFIGS_16.values())
    rows = [s for s in specs if s.name == "lora_mul_fwd per-sample r16" and s.dtype == torch.bfloat16]
    assert len(rows) == shipped
    for spec in specs:
        args = set(spec.fn.arg_names)
        assert set(spec.signature) | set(spec.constexprs) == args, spec.name
        assert not set(spec.signature) & set(spec.constexprs), spec.name
        assert set(spec.divisible) <= set(spec.signature), spec.name


def test_ragged_tails_build_w0m_in_the_kernels(device: str, monkeypatch) -> None:
    """At T = 197 each sample's 5-row tail runs in the two-GEMM kernels, which build their ``W0*M``
    tiles from the factors (docs/design.md section 9.3): the forward and the dX pass run no torch
    product, so no ``D x K`` tensor is made (the launcher built ``W0*M`` with ``mm`` and ``mul_``
    in each, twice per layer: issue 11 item 9). Whichever way the tail gets ``W0*M``, the rows of
    the per-sample tiles keep their bits and the tail rows agree to rounding; the buffer path (long
    per-token calls) still matches the reference."""
    case = Case("bf16", 197, 40, 24, 10, "sample", True, True, 2, True)
    inputs = make_inputs(case, device)
    x, w, bias, a, b, db, z = (None if inputs[n] is None else inputs[n].detach()
                               for n in ("x", "weight", "bias", "lora_a", "lora_b", "delta_bias", "noise"))
    op = lora_mul.op
    plan = lora_mul.sample_plan(case.tokens, lora_mul.SAMPLE_BLOCK_MS)
    assert (plan.main_rows, plan.tail_rows) == (192, 5)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = op._forward_impl(x, w, bias, a, b, db, z, case.tokens)
            dx = op._backward_impl(inputs["grad"], x, w, a, b, z, case.tokens, True, False, False)[0]
        products = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::mul_", "aten::mul")]
        return y, dx, products

    y, dx, products = run()
    assert products == []
    monkeypatch.setattr(op, "FACTOR_BUILD_MAX_ROWS", 0)
    y_buf, dx_buf, products = run()
    assert products == ["aten::mm", "aten::mul_"] * 2  # the probe sees the buffer being built

    main = torch.arange(x.shape[0], device=x.device) % case.tokens < plan.main_rows
    assert torch.equal(y[main], y_buf[main]) and torch.equal(dx[main], dx_buf[main])
    for got, buf in ((y[~main], y_buf[~main]), (dx[~main], dx_buf[~main])):
        # to rounding: within two bf16 ulps of the largest tail value (cancellation makes an
        # elementwise relative bound meaningless for the small ones)
        assert (got.float() - buf.float()).abs().max() <= 2 ** -7 * buf.float().abs().max()
    assert_matches_reference(inputs, "buffer path")
    monkeypatch.undo()
    assert_matches_reference(inputs, "factor path")


def test_two_copy_batch_equals_two_calls(device: str) -> None:
    """docs/design.md section 4: in ``[x; x]`` copy c of sample b is sample ``c*B + b`` with its own
    noise row."""
    case = Case("fp32", 50, 80, 48, 10, "sample", True, True, 3, True, samples=2)
    _cases.check_two_copy_batch(OP, make_inputs(case, device), case.samples, device)


def test_op_registration_passes_opcheck(device: str) -> None:
    """The torch.library ops: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    x, w, bias, a, lb, db, z = _cases.opcheck_inputs(device)
    torch.library.opcheck(torch.ops.pace.lora_mul_fwd.default, (x, w, bias, a, lb, db, z, 5))
    g = torch.randn(x.shape[0], w.shape[0], device=device)
    torch.library.opcheck(torch.ops.pace.lora_mul_bwd.default,
                          (g, x.detach(), w, a.detach(), lb.detach(), z, 5, True, True, True))


def test_autocast(device: str) -> None:
    """Under autocast the op computes in the autocast dtype, like F.linear, on both backends."""
    inputs = make_inputs(Case("fp32", 1, 80, 48, 10, "sample", True, True, 3, True), device)
    _cases.assert_autocast_like_reference(OP, inputs, device, rtol=3e-2)


def test_fallbacks_empty_and_bad_inputs(device: str) -> None:
    """float64 and ranks above MAX_RANK run the reference; an empty batch works; bad inputs raise
    the reference's errors."""
    _cases.assert_falls_back_to_reference(OP, lora_mul.MAX_RANK, device)

    x = torch.randn(0, 7, 8, device=device, requires_grad=True)
    a = torch.randn(2, 8, device=device, requires_grad=True)
    y = pace_kernels.lora_mul_linear(x, torch.randn(5, 8, device=device), None, a,
                                     torch.randn(5, 2, device=device), None, torch.randn(0, 5, device=device),
                                     backend="triton")
    assert y.shape == (0, 7, 5)
    assert torch.equal(torch.autograd.grad(y.sum(), [a])[0], torch.zeros_like(a))

    ok = dict(x=torch.randn(2, 3, 8), weight=torch.randn(6, 8), bias=None, lora_a=torch.randn(4, 8),
              lora_b=torch.randn(6, 4), delta_bias=None, noise=torch.randn(2, 6))
    for change in (dict(lora_b=torch.randn(6, 3)), dict(noise=torch.randn(3, 6)),
                   dict(weight=torch.randn(6, 8, dtype=torch.float16))):
        kwargs = {n: (t.to(device) if t is not None else None) for n, t in {**ok, **change}.items()}
        with pytest.raises((ValueError, TypeError)) as ref_err:
            pace_kernels.lora_mul_linear(**kwargs, backend="torch")
        with pytest.raises(ref_err.type, match=re.escape(str(ref_err.value))):
            pace_kernels.lora_mul_linear(**kwargs, backend="triton")


# ------------------------------------------------------------------------------------------------
# CUDA only: real sizes.


@cuda_only
@pytest.mark.parametrize("layer,k_in,d_out", [("qkv", 768, 2304), ("fc1", 768, 3072), ("fc2", 3072, 768)])
@pytest.mark.parametrize("noise", ["sample", "token", None])
def test_vit_b_sizes_bf16(layer: str, k_in: int, d_out: int, noise: str | None) -> None:
    """ViT-B layers, 2B x 197 = 25216 rows (B = 64, two copies), bf16: kernel vs reference, both vs fp32."""
    case = Case("bf16", 197, d_out, k_in, 16, noise, True, True, 3, True, samples=128)
    _cases.assert_relative_error_like_reference(OP, make_inputs(case, "cuda"), layer)


@cuda_only
def test_more_than_2_to_31_output_elements() -> None:
    """N * D > 2^31: row offsets must be int64 in every kernel (per-sample tiles and a tail)."""
    samples, tokens, k_in, d_out, rank = 2048, 1025, 64, 1024, 8
    assert samples * tokens * d_out > 2 ** 31
    case = Case("bf16", tokens, d_out, k_in, rank, "sample", True, True, 3, True, samples=samples)
    _cases.assert_int64_offsets(OP, make_inputs(case, "cuda"))


@cuda_only
def test_timing_noisy_vs_noise_free_vit_b_fc1(capsys) -> None:
    """Quick timing (printed, not asserted): fused lora_mul fwd+bwd on ViT-B fc1, 2B x 197 rows, bf16."""
    results = {}
    for noise in (None, "sample", "token"):
        case = Case("bf16", 197, 3072, 768, 16, noise, True, True, 3, True, samples=128)
        inputs = make_inputs(case, "cuda")
        for _ in range(3):
            forward_backward(inputs, "triton")
        torch.cuda.synchronize()
        start = time.perf_counter()
        reps = 10
        for _ in range(reps):
            forward_backward(inputs, "triton")
        torch.cuda.synchronize()
        results[noise] = (time.perf_counter() - start) / reps * 1e3
    with capsys.disabled():
        print(f"\n[lora_mul fc1 fwd+bwd, 25216x768x3072 bf16] noise-free {results[None]:.3f} ms, "
              f"per-sample {results['sample']:.3f} ms ({results['sample'] / results[None]:.2f}x), "
              f"per-token {results['token']:.3f} ms ({results['token'] / results[None]:.2f}x)")


def test_torch_compile_fullgraph_matches_eager(device: str) -> None:
    """A small model of PaceLinear (lora_mul_vpt_add and rlrr, noisy, backend="triton") compiles as
    one graph with the fused op in it, and matches eager."""
    from pace import PaceLinear

    def layer(k: int, d: int, kind: str) -> PaceLinear:
        m = PaceLinear(k, d, adapter=kind, rank=4, sigma=0.5, backend="triton", device=device)
        with torch.no_grad():  # B = 0 at init would hide the adapter path
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
        return m

    model = torch.nn.Sequential(layer(24, 40, "lora_mul_vpt_add"), torch.nn.GELU(),
                                layer(40, 16, "rlrr")).train()
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    _cases.assert_compiled_matches_eager(model, x)


def test_injected_vit_b_lora_mul_vpt_add_matches_reference(device: str) -> None:
    """timm ViT-B (12 blocks, 768 / 3072 wide; 32-pixel images keep the interpreter to ~2 minutes)
    injected with lora_mul_vpt_add and the PACE schedule (block 0 noise-free, the rest noisy): the
    same loss and adapter gradients with backend="triton" as with the reference."""
    timm = pytest.importorskip("timm")
    import pace

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, depth=12, num_classes=5)
    pace.inject(model, "lora_mul_vpt_add", rank=4, sigma=0.5)
    model = model.to(device).train()
    with torch.no_grad():  # B = 0 and P_d = 0 at init would hide the adapter paths
        for p in pace.trainable_parameters(model):
            p.normal_(0, 0.02)
    images = torch.randn(2, 3, 32, 32, device=device)
    labels = torch.tensor([1, 3], device=device)
    params = pace.trainable_parameters(model)

    results = {}
    for backend in ("triton", "torch"):
        pace.set_backend(model, backend)
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        results[backend] = (loss.detach(), torch.autograd.grad(loss, params))
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results["triton"][1], results["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * (b.abs().max().item() + 1e-12))
