"""The fused ``lora_add`` kernels against the reference path (docs/design.md sections 3 and 4).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), which is slow: shapes are
small and the case list covers every pair of axis values (dtype, T, D, K, rank, noise kind, bias,
delta bias, x rank, contiguity) instead of their product. On a CUDA machine the same tests run on
the GPU, plus the real-size cases at the end.

The accuracy criterion is in tests/pace_kernels/_cases.py.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pace_kernels
from tests.pace_kernels import _cases
from tests.pace_kernels._cases import GRAD_NAMES, Case, cuda_only

OP = "lora_add_linear"
forward_backward = partial(_cases.forward_backward, OP)
assert_matches_reference = partial(_cases.assert_matches_reference, OP)

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


def make_inputs(case: Case, device: str, seed: int = 0) -> _cases.Inputs:
    """:func:`_cases.make_inputs` with the factors of a trained LoRA: ``x A^T`` and ``U B^T`` keep
    unit scale (``A ~ K^-1/2``, ``B ~ r^-1/2``)."""
    return _cases.make_inputs(case, device, seed, a_scale=case.k_in ** -0.5, b_scale=case.rank ** -0.5)


@pytest.mark.parametrize("case", PAIRWISE, ids=str)
def test_matches_reference(case: Case, device: str) -> None:
    inputs = make_inputs(case, device)
    assert_matches_reference(inputs, str(case))


def test_pairwise_cases_cover_every_value() -> None:
    axes = dict(dtype={"fp32", "fp16", "bf16"}, tokens={197, 1}, d_out={17, 80, 130}, k_in={33, 48, 70},
                rank={1, 2, 10, 18}, noise={"sample", "token", None}, bias={True, False},
                delta_bias={True, False}, x_ndim={2, 3}, contiguous={True, False})
    _cases.assert_pairwise_coverage(PAIRWISE, axes)


@pytest.mark.parametrize("rank,delta_bias,mode", [(16, True, 1), (15, True, 2), (16, False, 2), (4, True, 2)])
def test_per_sample_noise_paths(rank: int, delta_bias: bool, mode: int, device: str) -> None:
    """Samples of >= 128 rows take the two-segment path (db folded into a spare rank slot); a full
    padded rank with db falls back to the gathered noise tile. Both must match the reference."""
    from pace_kernels._triton_utils import padded_rank
    from pace_kernels.lora_add.op import _noise_mode

    fold = delta_bias and rank < padded_rank(rank)
    assert _noise_mode(torch.ones(1), 130, folds_db=fold, has_db=delta_bias) == mode
    case = Case("fp16", 130, 48, 40, rank, "sample", True, delta_bias, 3, True, samples=3)
    assert_matches_reference(make_inputs(case, device), f"mode {mode}")


def test_strided_bias_and_delta_bias(device: str) -> None:
    """1-D ``bias`` and ``delta_bias`` with stride 2 (views such as ``t[::2]``) give the right output
    and ``delta_bias`` gradient: the kernels read them with unit stride, so the launcher must make
    them contiguous."""
    case = Case("fp32", 197, 80, 48, 10, "sample", True, True, 3, True)
    assert_matches_reference(_cases.with_strided_biases(make_inputs(case, device)), "strided biases")


def test_frozen_input_skips_dx(device: str) -> None:
    """x without requires_grad (the first adapted layer): the adapter gradients stay right."""
    case = Case("fp32", 197, 80, 48, 10, "sample", True, True, 3, True)
    inputs = make_inputs(case, device)
    inputs["x"] = inputs["x"].detach()
    assert_matches_reference(inputs, "frozen x")


def test_frozen_input_adapter_grads_bitwise_equal_trainable(device: str) -> None:
    """Without dX the P kernel runs one program per row tile (not one per column tile of dX); P,
    and so every adapter gradient, has the same bits as with dX (K = 140: several column tiles)."""
    case = Case("fp16", 130, 48, 140, 15, "sample", True, True, 3, True, samples=3)
    inputs = make_inputs(case, device)
    _, trainable = forward_backward(inputs, "triton")
    _, frozen = forward_backward(dict(inputs, x=inputs["x"].detach()), "triton")
    assert set(frozen) == {"lora_a", "lora_b", "delta_bias"}
    for name in frozen:
        assert torch.equal(frozen[name], trainable[name]), name


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
    """docs/design.md section 4: in ``[x; x]`` copy c of sample b is sample ``c*B + b`` with its own
    noise row."""
    case = Case("fp32", 197, 80, 48, 10, "sample", True, True, 3, True, samples=2)
    inputs = make_inputs(case, device)
    both, first, second, params = _cases.check_two_copy_batch(OP, inputs, case.samples, device)

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

    x, w, bias, a, lb, db, z = _cases.opcheck_inputs(device)
    n, d, r = x.shape[0], w.shape[0], a.shape[0]
    torch.library.opcheck(torch.ops.pace.lora_add_fwd.default, (x, w, bias, a, lb, db, z, 5))
    g, u = torch.randn(n, d, device=device), torch.randn(n, r, device=device)
    torch.library.opcheck(torch.ops.pace.lora_add_bwd.default,
                          (g, x.detach(), u, w, a.detach(), lb.detach(), z, 5, True))


def test_torch_compile_fullgraph_matches_eager(device: str) -> None:
    """A small model of PaceLinear (lora_add, noisy, backend="triton") compiles as one graph."""
    from pace import PaceLinear

    def layer(k: int, d: int) -> PaceLinear:
        m = PaceLinear(k, d, adapter="lora_add", rank=4, sigma=0.5, backend="triton", device=device)
        with torch.no_grad():  # B = 0 at init would hide the adapter path
            m.lora_b.normal_()
            m.delta_bias.normal_()
        return m

    model = torch.nn.Sequential(layer(24, 40), torch.nn.GELU(), layer(40, 16)).train()
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    _cases.assert_compiled_matches_eager(model, x)


def test_autocast(device: str) -> None:
    """Under autocast the op computes in the autocast dtype, like F.linear, on both backends."""
    case = Case("fp32", 1, 80, 48, 10, "sample", True, True, 3, True, samples=5)
    _cases.assert_autocast_like_reference(OP, make_inputs(case, device), device, rtol=2e-2)


def test_fallbacks_to_reference(device: str) -> None:
    """float64 and ranks above MAX_RANK run the reference (the kernels take fp32/fp16/bf16, r <= 64)."""
    from pace_kernels.lora_add import MAX_RANK

    _cases.assert_falls_back_to_reference(OP, MAX_RANK, device)


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

    ok = dict(x=t(2, 3, 8), weight=t(6, 8), bias=t(6), lora_a=t(4, 8), lora_b=t(6, 4), delta_bias=t(6),
              noise=t(2, 6))
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


@cuda_only
@pytest.mark.parametrize("layer,k_in,d_out", [("qkv", 768, 2304), ("fc1", 768, 3072), ("fc2", 3072, 768)])
@pytest.mark.parametrize("noise", ["sample", "token"])
def test_vit_b_sizes_bf16(layer: str, k_in: int, d_out: int, noise: str) -> None:
    """ViT-B layers, 2B x 197 = 25216 rows (B = 64, two copies), bf16: kernel vs reference, both vs fp32."""
    case = Case("bf16", 197, d_out, k_in, 16, noise, True, True, 3, True, samples=128)
    _cases.assert_relative_error_like_reference(OP, make_inputs(case, "cuda"), layer)


@cuda_only
def test_more_than_2_to_31_output_elements() -> None:
    """N * D > 2^31: row offsets must be int64 in every kernel."""
    samples, tokens, k_in, d_out, rank = 2048, 1025, 64, 1024, 8
    assert samples * tokens * d_out > 2 ** 31
    case = Case("bf16", tokens, d_out, k_in, rank, "sample", True, True, 3, True, samples=samples)
    _cases.assert_int64_offsets(OP, make_inputs(case, "cuda"))
