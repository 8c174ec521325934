"""The reference ops against an independent float64 computation of docs/design.md section 3.

Forward: the formula of docs/design.md section 3 written with einsum. Gradients: the hand-derived
backward formulas (``dX = G W0 + (Gz B) A`` and so on), not autograd, so a mistake in either side shows.
"""

import pytest
import torch

import pace_kernels
from pace_kernels import reference

CASES = [
    # (samples, tokens, K, D, rank, noise kind, bias)
    (2, 197, 33, 80, 1, "sample", True),
    (2, 197, 70, 17, 10, "token", False),
    (3, 5, 48, 130, 10, None, True),
    (1, 1, 33, 17, 1, "sample", False),
    (4, 3, 70, 130, 18, "token", True),
]


def _spec_forward_and_grads(op, x, w0, b0, a, b, db, z, g):
    """docs/design.md section 3 in float64: returns Y and (dX, dA, dB, d db)."""
    S, T, K = x.shape
    D = w0.shape[0]
    X = x.reshape(S * T, K)
    G = g.reshape(S * T, D)
    if z is None:
        Zr = torch.ones(S * T, D, dtype=x.dtype)
    elif z.ndim == 2:  # per sample: row i uses z[i // T]
        Zr = z[torch.arange(S * T) // T]
    else:
        Zr = z.reshape(S * T, D)
    Gz = Zr * G
    if op == "lora_add":
        U = X @ a.T
        Y = X @ w0.T + Zr * (U @ b.T)
        dX = G @ w0 + (Gz @ b) @ a
        dB = Gz.T @ U
        dA = (Gz @ b).T @ X
    else:
        Wm = w0 * (b @ a)
        Y = X @ w0.T + Zr * (X @ Wm.T)
        dX = G @ w0 + Gz @ Wm
        dM = (Gz.T @ X) * w0
        dB = dM @ a.T
        dA = b.T @ dM
    if b0 is not None:
        Y = Y + b0
    if db is not None:
        Y = Y + Zr * db
    d_db = Gz.sum(0)
    return Y.reshape(S, T, D), (dX.reshape(S, T, K), dA, dB, d_db)


@pytest.mark.parametrize("op", ["lora_add", "lora_mul"])
@pytest.mark.parametrize("S,T,K,D,r,noise,has_bias", CASES)
def test_reference_matches_spec(op, S, T, K, D, r, noise, has_bias):
    f64 = torch.float64
    x = torch.randn(S, T, K, dtype=f64)
    w0 = torch.randn(D, K, dtype=f64) / K**0.5
    b0 = torch.randn(D, dtype=f64) if has_bias else None
    a = torch.randn(r, K, dtype=f64)
    b = torch.randn(D, r, dtype=f64)
    db = torch.randn(D, dtype=f64)
    z = None
    if noise == "sample":
        z = 1 + 0.5 * torch.randn(S, D, dtype=f64)
    elif noise == "token":
        z = 1 + 0.5 * torch.randn(S, T, D, dtype=f64)
    g = torch.randn(S, T, D, dtype=f64)
    y_spec, grads_spec = _spec_forward_and_grads(op, x, w0, b0, a, b, db, z, g)

    fn = getattr(reference, f"{op}_linear")
    for dtype, tol in ((f64, 1e-10), (torch.float32, 2e-4)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, a, b, db)]
        xx, aa, bb, dd = leaves
        y = fn(
            xx,
            w0.to(dtype),
            None if b0 is None else b0.to(dtype),
            aa,
            bb,
            dd,
            None if z is None else z.to(dtype),
        )
        y.backward(g.to(dtype))
        scale = y_spec.abs().max()
        torch.testing.assert_close(y.double() / scale, y_spec / scale, atol=tol, rtol=tol)
        for name, leaf, ref in zip(("x", "lora_a", "lora_b", "delta_bias"), leaves, grads_spec):
            s = ref.abs().max()
            torch.testing.assert_close(
                leaf.grad.double() / s, ref / s, atol=tol, rtol=tol, msg=f"grad of {name}"
            )


def test_two_dim_x_per_row_noise():
    x = torch.randn(7, 33, dtype=torch.float64)
    w0, a, b = (
        torch.randn(17, 33, dtype=torch.float64),
        torch.randn(2, 33, dtype=torch.float64),
        torch.randn(17, 2, dtype=torch.float64),
    )
    z = torch.rand(7, 17, dtype=torch.float64) + 0.5
    y = reference.lora_add_linear(x, w0, None, a, b, None, z)
    torch.testing.assert_close(y, x @ w0.T + z * (x @ a.T @ b.T))


def test_frozen_weight_and_noise_get_no_gradient():
    w0 = torch.randn(5, 4, requires_grad=True)
    z = torch.rand(2, 5, requires_grad=True)
    a = torch.randn(3, 4, requires_grad=True)
    reference.lora_mul_linear(torch.randn(2, 6, 4), w0, None, a, torch.randn(5, 3), None, z).sum().backward()
    assert w0.grad is None and z.grad is None and a.grad is not None


def test_dispatch_torch_backend_is_reference():
    x, w0, a, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    for op in ("lora_add_linear", "lora_mul_linear"):
        got = getattr(pace_kernels, op)(x, w0, None, a, b, backend="torch")
        torch.testing.assert_close(got, getattr(reference, op)(x, w0, None, a, b))


def test_dispatch_under_autocast_casts_operands():
    x, w0, a, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pace_kernels.lora_add_linear(x, w0, None, a, b, backend="torch")
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("op", ["lora_add_linear", "lora_mul_linear"])
def test_bad_inputs_raise_clear_errors(op):
    fn = getattr(reference, op)
    x, w0, a, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    bad = [
        (dict(x=torch.randn(2, 3, 7)), ValueError, r"x must have shape \[\.\.\., 8\]"),
        (dict(weight=torch.randn(5, 8, 1)), ValueError, "weight must be 2-D"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \[5\]"),
        (dict(lora_a=torch.randn(2, 9)), ValueError, r"lora_a must have shape \[rank, 8\]"),
        (dict(lora_b=torch.randn(5, 3)), ValueError, r"lora_b must have shape \[5, 2\]"),
        (dict(delta_bias=torch.randn(6)), ValueError, r"delta_bias must have shape \[5\]"),
        (dict(noise=torch.randn(3, 5)), ValueError, r"noise must have shape \[2, 5\] \(per sample\)"),
        (dict(x=torch.randint(0, 3, (2, 3, 8))), TypeError, "x must be a floating-point tensor"),
        (dict(weight=torch.randn(5, 8, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
        (dict(lora_a="nope"), TypeError, "lora_a must be a torch.Tensor"),
        (dict(noise=torch.randn(2, 5, device="meta")), ValueError, "noise is on meta"),
    ]
    for override, exc, msg in bad:
        args = dict(x=x, weight=w0, bias=None, lora_a=a, lora_b=b, delta_bias=None, noise=None)
        args.update(override)
        with pytest.raises(exc, match=msg):
            fn(**args)
    with pytest.raises(ValueError, match="backend must be"):
        getattr(pace_kernels, op)(x, w0, None, a, b, backend="cuda")
