"""Helpers shared by the kernel tests of both fused ops (test_lora_add.py, test_lora_mul.py).

The two ops take the reference's arguments ``(x, weight, bias, lora_a, lora_b, delta_bias, noise)``
and are tested the same way; ``op`` below names one (``"lora_add_linear"`` or ``"lora_mul_linear"``),
called through :mod:`pace_kernels` (the dispatching entry point, ``backend=``) or
:mod:`pace_kernels.reference`. The case lists, the factor scales and the assertions of each op stay
in its own test file.

Accuracy criterion: the kernels accumulate in fp32 and round once, the reference rounds after every
op, so both are compared with a float64 evaluation of the same formula: the kernel's error may be at
most twice the reference's own error plus a small floor (:data:`FLOOR`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import pace_kernels
from pace_kernels import reference

CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Floor of the allowed error, relative to the largest magnitude of the float64 result.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_NAMES = ("x", "lora_a", "lora_b", "delta_bias")
ARGS = ("x", "weight", "bias", "lora_a", "lora_b", "delta_bias", "noise")

Inputs = dict[str, "torch.Tensor | None"]


@dataclass
class Case:
    dtype: str
    tokens: int
    d_out: int
    k_in: int
    rank: int
    noise: str | None  # "sample", "token" or None
    bias: bool
    delta_bias: bool
    x_ndim: int
    contiguous: bool
    samples: int = 0  # 0: by T (2 at T > 100, 3 at 2..100, 5 at 1)
    noise_dtype: torch.dtype | None = None  # None: fp32

    def __post_init__(self) -> None:
        if self.samples == 0:
            self.samples = 2 if self.tokens > 100 else 3 if self.tokens > 1 else 5

    def __str__(self) -> str:
        layout = "c" if self.contiguous else "nc"
        return (f"{self.dtype}-T{self.tokens}-D{self.d_out}-K{self.k_in}-r{self.rank}-{self.noise}"
                f"-b{int(self.bias)}-db{int(self.delta_bias)}-{self.x_ndim}d-{layout}")


def make_inputs(case: Case, device: str, seed: int = 0, *, a_scale: float, b_scale: float) -> Inputs:
    """Leaf tensors of one call, plus ``grad`` (the upstream gradient); ``x`` is 2-D ``[B*T, K]`` or
    3-D ``[B, T, K]``, non-contiguous when asked (every other column of a wider tensor). ``lora_a``
    and ``lora_b`` are standard normal times ``a_scale`` / ``b_scale`` (each op's test file says why
    its scales)."""
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
        lora_a=rnd(r, k, scale=a_scale).to(dtype).requires_grad_(),
        lora_b=rnd(d, r, scale=b_scale).to(dtype).requires_grad_(),
        delta_bias=rnd(d, scale=0.5).to(dtype).requires_grad_() if case.delta_bias else None,
        noise=noise,
        grad=rnd(*lead, d).to(dtype),
    )


def forward_backward(op: str, inputs: Inputs, backend: str, dtype: torch.dtype | None = None):
    """Output and gradients of every leaf that requires grad (``dtype``: run on copies cast to it).
    ``backend`` is a dispatch backend (``"triton"``, ``"torch"``) or ``"reference"`` (the module)."""
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
        y = getattr(reference, op)(*args)
    else:
        y = getattr(pace_kernels, op)(*args, backend=backend)
    grad = inputs["grad"] if dtype is None else inputs["grad"].to(dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), grad) if leaves else []
    return y.detach(), dict(zip(leaves, grads))


def assert_matches_reference(op: str, inputs: Inputs, label: str = "") -> None:
    """Output and gradients of the Triton backend within the accuracy criterion (module docstring)."""
    dtype = inputs["x"].dtype
    y_k, g_k = forward_backward(op, inputs, "triton")
    y_r, g_r = forward_backward(op, inputs, "torch")
    y_64, g_64 = forward_backward(op, inputs, "reference", torch.float64)
    assert y_k.dtype == dtype and y_k.shape == y_r.shape
    assert set(g_k) == set(g_r) == set(g_64)
    results = [("y", y_k, y_r, y_64)] + [(n, g_k[n], g_r[n], g_64[n]) for n in g_64]
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


def with_strided_biases(inputs: Inputs) -> Inputs:
    """``inputs`` with ``bias`` and ``delta_bias`` replaced by the same values as every other element
    of a twice-as-long tensor (stride 2), ``delta_bias`` still a leaf that requires grad."""
    out = dict(inputs)
    for name in ("bias", "delta_bias"):
        t = inputs[name]
        assert t is not None, f"{name} needed"
        wide = torch.zeros(2 * t.numel(), device=t.device, dtype=t.dtype)
        wide[::2] = t.detach()
        strided = wide[::2]
        assert strided.stride() == (2,) and torch.equal(strided, t.detach())
        out[name] = strided.requires_grad_(t.requires_grad)
    return out


def assert_pairwise_coverage(cases: Iterable[Case], axes: Mapping[str, set]) -> None:
    """Every pair of values of any two axes (``Case`` field -> values) occurs in some case."""
    cases = list(cases)
    names = list(axes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seen = {(getattr(c, a), getattr(c, b)) for c in cases}
            want = {(va, vb) for va in axes[a] for vb in axes[b]}
            assert want <= seen, f"pairs of {a} x {b} missing: {want - seen}"


def opcheck_inputs(device: str, n: int = 10, k: int = 20, d: int = 24, r: int = 3):
    """``(x, weight, bias, lora_a, lora_b, delta_bias, noise)`` for ``torch.library.opcheck`` of a
    forward op: ``x`` and the adapter require grad, noise is per sample over 2 samples (5 rows each)."""
    x = torch.randn(n, k, device=device, requires_grad=True)
    w, bias = torch.randn(d, k, device=device), torch.randn(d, device=device)
    a = torch.randn(r, k, device=device, requires_grad=True)
    lb = torch.randn(d, r, device=device, requires_grad=True)
    db = torch.randn(d, device=device, requires_grad=True)
    z = torch.randn(2, d, device=device)
    return x, w, bias, a, lb, db, z


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(model, fullgraph=True)`` makes one graph, and its output and the gradients of
    ``x`` and the trainable parameters match eager (the same noise draws: ``fallback_random``)."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def step(fn: Callable) -> tuple:
        torch.manual_seed(1)
        y = fn(x)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y.square().sum(), [x] + params)
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


def check_two_copy_batch(op: str, inputs: Inputs, samples: int, device: str):
    """docs/design.md section 4: in ``[x; x]`` copy c of sample b is sample ``c*B + b`` with its own
    noise row. One call on the two-copy batch equals two calls, and the copies differ. Returns ``(both, first,
    second, params)`` (the adapter in ``params`` requires grad) for the caller's further checks."""
    x = inputs["x"].detach()
    noise = 1.0 + 0.5 * torch.randn(2 * samples, inputs["weight"].shape[0], device=device)
    params = {n: inputs[n] for n in ("weight", "bias", "lora_a", "lora_b", "delta_bias")}
    fn = getattr(pace_kernels, op)
    both = fn(torch.cat([x, x]), noise=noise, backend="triton", **params)
    first = fn(x, noise=noise[:samples], backend="triton", **params)
    second = fn(x, noise=noise[samples:], backend="triton", **params)
    torch.testing.assert_close(both[:samples], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[samples:], second, rtol=1e-5, atol=1e-5)
    assert (both[:samples] - both[samples:]).abs().max() > 1e-2, "the two copies must get different noise"
    return both, first, second, params


def assert_falls_back_to_reference(op: str, max_rank: int, device: str) -> None:
    """float64 inputs and ranks above ``max_rank`` give the reference's result with backend="triton"."""
    for dtype, rank in ((torch.float64, 4), (torch.float32, max_rank + 1)):
        def rnd(*shape, dtype=dtype):
            return torch.randn(*shape, device=device, dtype=dtype)

        args = (rnd(2, 3, 8), rnd(6, 8), None, rnd(rank, 8), rnd(6, rank))
        torch.testing.assert_close(getattr(pace_kernels, op)(*args, backend="triton"),
                                   getattr(reference, op)(*args))


def assert_autocast_like_reference(op: str, inputs: Inputs, device: str, rtol: float) -> None:
    """Under autocast the op computes in the autocast dtype, like F.linear, on both backends: the
    outputs agree within ``rtol`` (relative to the largest), the gradient of ``lora_b`` within 3e-2
    and in the parameter's own dtype (fp32)."""
    amp = torch.float16 if device == "cuda" else torch.bfloat16
    args = [inputs[n] for n in ARGS]
    fn = getattr(pace_kernels, op)
    with torch.autocast(device_type=device, dtype=amp):
        y_k = fn(*args, backend="triton")
        y_r = fn(*args, backend="torch")
    assert y_k.dtype == y_r.dtype == amp
    scale = y_r.float().abs().max().item()
    torch.testing.assert_close(y_k.float(), y_r.float(), rtol=rtol, atol=rtol * scale)
    g_k = torch.autograd.grad(y_k.float().sum(), inputs["lora_b"])[0]
    g_r = torch.autograd.grad(y_r.float().sum(), inputs["lora_b"])[0]
    assert g_k.dtype == torch.float32  # the parameter's own dtype
    torch.testing.assert_close(g_k, g_r, rtol=3e-2, atol=3e-2 * g_r.abs().max().item())


# ------------------------------------------------------------------------------------------------
# CUDA only: real sizes.


def cuda_only(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA device (real sizes)")(fn))


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.float() - exact.float()).abs().max() / (exact.float().abs().max() + 1e-12)).item()


def assert_relative_error_like_reference(op: str, inputs: Inputs, label: str) -> None:
    """Real sizes: against an fp32 evaluation (float64 would be too slow), the kernel's relative
    error is at most twice the reference's plus 1e-2, for the output and every gradient."""
    y_k, g_k = forward_backward(op, inputs, "triton")
    y_r, g_r = forward_backward(op, inputs, "torch")
    y_32, g_32 = forward_backward(op, inputs, "reference", torch.float32)
    for name, got, ref, exact in [("y", y_k, y_r, y_32)] + [(n, g_k[n], g_r[n], g_32[n]) for n in g_32]:
        err_k, err_r = relative_error(got, exact), relative_error(ref, exact)
        assert err_k <= 2 * err_r + 1e-2, f"{label} {name}: kernel {err_k:.3g}, reference {err_r:.3g}"


def assert_int64_offsets(op: str, inputs: Inputs) -> None:
    """N * D > 2^31: the kernel's output and gradients are close to the reference's, the last rows
    (past 2^31 elements of y) included, so row offsets are int64 in every kernel."""
    y_k, g_k = forward_backward(op, inputs, "triton")
    y_r, g_r = forward_backward(op, inputs, "torch")
    for name, got, ref in [("y", y_k, y_r)] + [(n, g_k[n], g_r[n]) for n in g_r]:
        assert relative_error(got, ref) < 3e-2, name
    torch.testing.assert_close(y_k[-1, -5:].float(), y_r[-1, -5:].float(), rtol=3e-2, atol=3e-2)
