"""The fused ``lora_add`` kernels against the reference path (SPEC sections 3 and 4).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), which is slow: shapes are
small and the case list covers every pair of axis values (dtype, T, D, K, rank, noise kind, bias,
delta bias, x rank, contiguity) instead of their product. On a CUDA machine the same tests run on
the GPU, plus the real-size cases at the end.

Accuracy criterion: the kernels accumulate in fp32 and round once, the reference rounds after every
op, so both are compared with a float64 evaluation of the same formula: the kernel's error may be
at most twice the reference's own error plus a small floor, and it must match the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pace_kernels
from pace_kernels import reference

CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Floor of the allowed error, relative to the largest magnitude of the float64 result.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_NAMES = ("x", "lora_a", "lora_b", "delta_bias")


@dataclass
class Case:
    dtype: str
    tokens: int
    d_out: int
    k_in: int
    rank: int
    noise: Optional[str]  # "sample", "token" or None
    bias: bool
    delta_bias: bool
    x_ndim: int
    contiguous: bool
    samples: int = 2
    noise_dtype: Optional[torch.dtype] = None  # None: fp32

    def __str__(self) -> str:
        return (f"{self.dtype}-T{self.tokens}-D{self.d_out}-K{self.k_in}-r{self.rank}-{self.noise}"
                f"-b{int(self.bias)}-db{int(self.delta_bias)}-{self.x_ndim}d-{'c' if self.contiguous else 'nc'}")


# Every pair of values of any two axes occurs in at least one case (15 cases instead of 5184).
PAIRWISE = [
    Case("fp16", 1, 80, 33, 18, None, False, False, 2, False, samples=5),
    Case("fp16", 197, 130, 70, 10, "sample", True, True, 3, True),
    Case("bf16", 1, 17, 48, 1, "token", True, False, 2, True, samples=5),
    Case("fp32", 197, 80, 48, 2, "sample", True, True, 3, False),
    Case("bf16", 1, 130, 33, 2, None, False, True, 3, True, samples=5),
    Case("fp32", 1, 17, 70, 10, "token", False, False, 3, False, samples=5),
    Case("fp32", 197, 130, 33, 1, "token", True, False, 2, False),
    Case("bf16", 197, 130, 48, 18, "sample", False, True, 2, True, samples=1),
    Case("bf16", 197, 17, 70, 1, None, True, True, 3, True),
    Case("fp16", 197, 17, 70, 2, "token", True, False, 2, False, samples=1, noise_dtype=torch.float16),
    Case("fp32", 197, 17, 33, 18, "sample", False, False, 3, True, noise_dtype=torch.float64),
    Case("bf16", 1, 80, 70, 18, "token", True, True, 3, False, samples=5, noise_dtype=torch.bfloat16),
    Case("fp32", 1, 80, 48, 10, None, False, True, 2, True, samples=5),
    Case("fp16", 1, 80, 48, 1, "sample", False, True, 3, True, samples=5),
    Case("bf16", 1, 130, 33, 10, "token", True, True, 3, False, samples=5),
]


def make_inputs(case: Case, device: str, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """Leaf tensors of one call; ``x`` is 2-D ``[B*T, K]`` or 3-D ``[B, T, K]``, non-contiguous
    when asked (every other column of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    b, t, k, d, r = case.samples, case.tokens, case.k_in, case.d_out, case.rank
    lead = (b, t) if case.x_ndim == 3 else (b * t,)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    if case.contiguous:
        x = rnd(*lead, k).to(dtype)
    else:
        x = rnd(*lead, 2 * k).to(dtype)[..., ::2]
        assert not x.is_contiguous()
    noise = None
    if case.noise is not None:
        shape = (lead[0], d) if case.noise == "sample" else (*lead, d)
        noise = (1.0 + 0.5 * rnd(*shape)).to(case.noise_dtype or torch.float32)
    return dict(
        x=x.requires_grad_(),
        weight=rnd(d, k, scale=k ** -0.5).to(dtype),
        bias=rnd(d, scale=0.5).to(dtype) if case.bias else None,
        lora_a=rnd(r, k, scale=k ** -0.5).to(dtype).requires_grad_(),
        lora_b=rnd(d, r, scale=r ** -0.5).to(dtype).requires_grad_(),
        delta_bias=rnd(d, scale=0.5).to(dtype).requires_grad_() if case.delta_bias else None,
        noise=noise,
        grad=rnd(*lead, d).to(dtype),
    )


ARGS = ("x", "weight", "bias", "lora_a", "lora_b", "delta_bias", "noise")


def forward_backward(inputs: Dict[str, Optional[torch.Tensor]], backend: str, dtype: Optional[torch.dtype] = None):
    """Output and gradients of every leaf that requires grad (``dtype``: run on copies cast to it)."""
    leaves = {}
    args = []
    for name in ARGS:
        t = inputs[name]
        if t is not None and dtype is not None:
            t = t.detach().to(dtype).requires_grad_(t.requires_grad)
        if t is not None and t.requires_grad:
            leaves[name] = t
        args.append(t)
    if backend == "reference":
        y = reference.lora_add_linear(*args)
    else:
        y = pace_kernels.lora_add_linear(*args, backend=backend)
    grad = inputs["grad"] if dtype is None else inputs["grad"].to(dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), grad) if leaves else []
    return y.detach(), dict(zip(leaves, grads))


def assert_matches_reference(inputs, label: str = "") -> None:
    dtype = inputs["x"].dtype
    y_k, g_k = forward_backward(inputs, "triton")
    y_r, g_r = forward_backward(inputs, "torch")
    y_64, g_64 = forward_backward(inputs, "reference", torch.float64)
    assert y_k.dtype == dtype and y_k.shape == y_r.shape
    results = [("y", y_k, y_r, y_64)] + [(n, g_k[n], g_r[n], g_64[n]) for n in g_64]
    assert set(g_k) == set(g_r) == set(g_64)
    for name, got, ref, exact in results:
        assert got.shape == exact.shape and got.dtype == ref.dtype, name
        assert torch.isfinite(got).all(), f"{label} {name}: non-finite values"
        scale = exact.abs().max().item() + 1e-12
        err_kernel = (got.double() - exact).abs().max().item()
        err_ref = (ref.double() - exact).abs().max().item()
        allowed = 2 * err_ref + FLOOR[dtype] * scale
        assert err_kernel <= allowed, (
            f"{label} {name}: kernel error {err_kernel:.3g} > allowed {allowed:.3g} "
            f"(reference error {err_ref:.3g}, scale {scale:.3g})")


@pytest.mark.parametrize("case", PAIRWISE, ids=str)
def test_matches_reference(case: Case, device: str) -> None:
    inputs = make_inputs(case, device)
    assert_matches_reference(inputs, str(case))


def test_pairwise_cases_cover_every_value() -> None:
    axes = dict(dtype={"fp32", "fp16", "bf16"}, tokens={197, 1}, d_out={17, 80, 130}, k_in={33, 48, 70},
                rank={1, 2, 10, 18}, noise={"sample", "token", None}, bias={True, False},
                delta_bias={True, False}, x_ndim={2, 3}, contiguous={True, False})
    names = list(axes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seen = {(getattr(c, a), getattr(c, b)) for c in PAIRWISE}
            want = {(va, vb) for va in axes[a] for vb in axes[b]}
            assert want <= seen, f"pairs of {a} x {b} missing: {want - seen}"


@pytest.mark.parametrize("rank,delta_bias,mode", [(16, True, 1), (15, True, 2), (16, False, 2), (4, True, 2)])
def test_per_sample_noise_paths(rank: int, delta_bias: bool, mode: int, device: str) -> None:
    """Samples of >= 128 rows take the two-segment path (db folded into a spare rank slot); a full
    padded rank with db falls back to the gathered noise tile. Both must match the reference."""
    from pace_kernels.lora_add import _noise_mode, padded_rank

    fold = delta_bias and rank < padded_rank(rank)
    assert _noise_mode(torch.ones(1), 130, fold, delta_bias) == mode
    case = Case("fp16", 130, 48, 40, rank, "sample", True, delta_bias, 3, True, samples=3)
    assert_matches_reference(make_inputs(case, device), f"mode {mode}")


def test_frozen_input_skips_dx(device: str) -> None:
    """x without requires_grad (the first adapted layer): the adapter gradients stay right."""
    case = Case("fp32", 197, 80, 48, 10, "sample", True, True, 3, True)
    inputs = make_inputs(case, device)
    inputs["x"] = inputs["x"].detach()
    assert_matches_reference(inputs, "frozen x")


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    samples=st.integers(1, 3),
    tokens=st.integers(1, 20),
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
    """Two backward passes give identical bits (no atomics; the split reductions run in a fixed order)."""
    case = Case("fp16", 197, 130, 70, 10, "sample", True, True, 3, True, samples=3)
    inputs = make_inputs(case, device)
    _, first = forward_backward(inputs, "triton")
    _, second = forward_backward(inputs, "triton")
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name


def test_two_copy_batch_equals_two_calls(device: str) -> None:
    """SPEC section 4: in ``[x; x]`` copy c of sample b is sample ``c*B + b`` with its own noise row."""
    case = Case("fp32", 197, 80, 48, 10, "sample", True, True, 3, True, samples=2)
    inputs = make_inputs(case, device)
    x, b = inputs["x"].detach(), case.samples
    noise = 1.0 + 0.5 * torch.randn(2 * b, case.d_out, device=device)
    params = {n: inputs[n] for n in ("weight", "bias", "lora_a", "lora_b", "delta_bias")}

    both = pace_kernels.lora_add_linear(torch.cat([x, x]), noise=noise, backend="triton", **params)
    first = pace_kernels.lora_add_linear(x, noise=noise[:b], backend="triton", **params)
    second = pace_kernels.lora_add_linear(x, noise=noise[b:], backend="triton", **params)
    torch.testing.assert_close(both[:b], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[b:], second, rtol=1e-5, atol=1e-5)
    assert (both[:b] - both[b:]).abs().max() > 1e-2, "the two copies must get different noise"

    # Gradients of the shared adapter are the sums of the two calls' gradients.
    adapter = [params["lora_a"], params["lora_b"], params["delta_bias"]]
    g_both = torch.autograd.grad(both.square().sum(), adapter)
    g_1 = torch.autograd.grad(first.square().sum(), adapter)
    g_2 = torch.autograd.grad(second.square().sum(), adapter)
    for gb, ga, gc in zip(g_both, g_1, g_2):
        torch.testing.assert_close(gb, ga + gc, rtol=1e-4, atol=1e-4)


def test_op_registration_passes_opcheck(device: str) -> None:
    """The torch.library ops: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    import pace_kernels.lora_add  # noqa: F401  (registers torch.ops.pace.*)

    n, k, d, r = 10, 20, 24, 3
    x = torch.randn(n, k, device=device, requires_grad=True)
    w, bias = torch.randn(d, k, device=device), torch.randn(d, device=device)
    a = torch.randn(r, k, device=device, requires_grad=True)
    lb = torch.randn(d, r, device=device, requires_grad=True)
    db = torch.randn(d, device=device, requires_grad=True)
    z = torch.randn(2, d, device=device)
    torch.library.opcheck(torch.ops.pace.lora_add_fwd.default, (x, w, bias, a, lb, db, z, 5))
    g, u = torch.randn(n, d, device=device), torch.randn(n, r, device=device)
    torch.library.opcheck(torch.ops.pace.lora_add_bwd.default,
                          (g, x.detach(), u, w, a.detach(), lb.detach(), z, 5, True))


def test_torch_compile_fullgraph_matches_eager(device: str) -> None:
    """A small model of PaceLinear (lora_add, noisy, backend="triton") compiles as one graph."""
    import torch._dynamo
    import torch._inductor.config

    from pace import PaceLinear

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def layer(k: int, d: int) -> PaceLinear:
        m = PaceLinear(k, d, adapter="lora_add", rank=4, sigma=0.5, backend="triton", device=device)
        with torch.no_grad():  # B = 0 at init would hide the adapter path
            m.lora_b.normal_()
            m.delta_bias.normal_()
        return m

    model = torch.nn.Sequential(layer(24, 40), torch.nn.GELU(), layer(40, 16)).train()
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)

    def step(fn):
        torch.manual_seed(1)
        y = fn(x)
        grads = torch.autograd.grad(y.square().sum(), [x] + [p for p in model.parameters() if p.requires_grad])
        return y.detach(), grads

    y_eager, g_eager = step(model)
    # fallback_random: the compiled graph draws the noise with eager's RNG, so both see the same z.
    with torch._inductor.config.patch(fallback_random=True):
        y_comp, g_comp = step(torch.compile(model, fullgraph=True))
    assert torch._dynamo.utils.counters["graph_break"] == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_autocast(device: str) -> None:
    """Under autocast the op computes in the autocast dtype, like F.linear, on both backends."""
    amp = torch.float16 if device == "cuda" else torch.bfloat16
    case = Case("fp32", 1, 80, 48, 10, "sample", True, True, 3, True, samples=5)
    inputs = make_inputs(case, device)
    args = [inputs[n] for n in ARGS]
    with torch.autocast(device_type=device, dtype=amp):
        y_k = pace_kernels.lora_add_linear(*args, backend="triton")
        y_r = pace_kernels.lora_add_linear(*args, backend="torch")
    assert y_k.dtype == y_r.dtype == amp
    torch.testing.assert_close(y_k.float(), y_r.float(), rtol=2e-2, atol=2e-2 * y_r.float().abs().max().item())
    g_k = torch.autograd.grad(y_k.float().sum(), inputs["lora_b"])[0]
    g_r = torch.autograd.grad(y_r.float().sum(), inputs["lora_b"])[0]
    assert g_k.dtype == torch.float32  # the parameter's own dtype
    torch.testing.assert_close(g_k, g_r, rtol=3e-2, atol=3e-2 * g_r.abs().max().item())


def test_fallbacks_to_reference(device: str) -> None:
    """float64 and ranks above MAX_RANK run the reference (the kernels take fp32/fp16/bf16, r <= 64)."""
    from pace_kernels.lora_add import MAX_RANK

    for dtype, rank in ((torch.float64, 4), (torch.float32, MAX_RANK + 1)):
        x = torch.randn(2, 3, 8, device=device, dtype=dtype)
        args = (x, torch.randn(6, 8, device=device, dtype=dtype), None,
                torch.randn(rank, 8, device=device, dtype=dtype), torch.randn(6, rank, device=device, dtype=dtype))
        torch.testing.assert_close(pace_kernels.lora_add_linear(*args, backend="triton"),
                                   reference.lora_add_linear(*args))


def test_empty_batch(device: str) -> None:
    x = torch.randn(0, 7, 8, device=device, requires_grad=True)
    a = torch.randn(2, 8, device=device, requires_grad=True)
    y = pace_kernels.lora_add_linear(x, torch.randn(5, 8, device=device), None, a,
                                     torch.randn(5, 2, device=device), None, None, backend="triton")
    assert y.shape == (0, 7, 5)
    (ga,) = torch.autograd.grad(y.sum(), [a])
    assert torch.equal(ga, torch.zeros_like(a))


def _bad_inputs(device: str):
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)

    ok = dict(x=t(2, 3, 8), weight=t(6, 8), bias=t(6), lora_a=t(4, 8), lora_b=t(6, 4), delta_bias=t(6), noise=t(2, 6))
    bad = {
        "weight 1-D": dict(weight=t(48)),
        "x last dim": dict(x=t(2, 3, 7)),
        "bias shape": dict(bias=t(5)),
        "lora_a in_features": dict(lora_a=t(4, 9)),
        "lora_b shape": dict(lora_b=t(6, 3)),
        "delta_bias shape": dict(delta_bias=t(7)),
        "noise shape": dict(noise=t(3, 6)),
        "dtype mismatch": dict(weight=t(6, 8, dtype=torch.float16)),
        "integer x": dict(x=torch.ones(2, 3, 8, dtype=torch.int64, device=device)),
        "lora_a not a tensor": dict(lora_a=[[1.0] * 8] * 4),
        "lora_b None": dict(lora_b=None),
    }
    for name, change in bad.items():
        yield name, {**ok, **change}


@pytest.mark.parametrize("name", [n for n, _ in _bad_inputs("cpu")])
def test_bad_inputs_raise_like_reference(name: str, device: str) -> None:
    kwargs = dict(_bad_inputs(device))[name]
    with pytest.raises((ValueError, TypeError)) as ref_err:
        pace_kernels.lora_add_linear(**kwargs, backend="torch")
    with pytest.raises(ref_err.type) as kernel_err:
        pace_kernels.lora_add_linear(**kwargs, backend="triton")
    assert str(kernel_err.value) == str(ref_err.value)


# ------------------------------------------------------------------------------------------------
# CUDA only: real sizes.

def cuda_only(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA device (real sizes)")(fn))


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.float() - exact.float()).abs().max() / (exact.float().abs().max() + 1e-12)).item()


@cuda_only
@pytest.mark.parametrize("layer,k_in,d_out", [("qkv", 768, 2304), ("fc1", 768, 3072), ("fc2", 3072, 768)])
@pytest.mark.parametrize("noise", ["sample", "token"])
def test_vit_b_sizes_bf16(layer: str, k_in: int, d_out: int, noise: str) -> None:
    """ViT-B layers, 2B x 197 = 25216 rows (B = 64, two copies), bf16: kernel vs reference, both vs fp32."""
    case = Case("bf16", 197, d_out, k_in, 16, noise, True, True, 3, True, samples=128)
    inputs = make_inputs(case, "cuda")
    y_k, g_k = forward_backward(inputs, "triton")
    y_r, g_r = forward_backward(inputs, "torch")
    y_32, g_32 = forward_backward(inputs, "reference", torch.float32)
    for name, got, ref, exact in [("y", y_k, y_r, y_32)] + [(n, g_k[n], g_r[n], g_32[n]) for n in g_32]:
        err_k, err_r = _relative_error(got, exact), _relative_error(ref, exact)
        assert err_k <= 2 * err_r + 1e-2, f"{layer} {name}: kernel {err_k:.3g}, reference {err_r:.3g}"


@cuda_only
def test_more_than_2_to_31_output_elements() -> None:
    """N * D > 2^31: row offsets must be int64 in every kernel."""
    samples, tokens, k_in, d_out, rank = 2048, 1025, 64, 1024, 8
    assert samples * tokens * d_out > 2 ** 31
    case = Case("bf16", tokens, d_out, k_in, rank, "sample", True, True, 3, True, samples=samples)
    inputs = make_inputs(case, "cuda")
    y_k, g_k = forward_backward(inputs, "triton")
    y_r, g_r = forward_backward(inputs, "torch")
    for name, got, ref in [("y", y_k, y_r)] + [(n, g_k[n], g_r[n]) for n in g_r]:
        assert _relative_error(got, ref) < 3e-2, name
    # The last rows (past 2^31 elements of y) are right, not just the bulk.
    torch.testing.assert_close(y_k[-1, -5:].float(), y_r[-1, -5:].float(), rtol=3e-2, atol=3e-2)
