"""PaceLinear, every adapter kind, against docs/design.md section 2's formulas, independently in float64."""

import math

import pytest
import torch
import torch.nn as nn

import pace


def _spec_dh(kind, p, w0, b0, x):
    """``dh(x) = x dW^T + db`` of docs/design.md section 2, from the layer's tensors (float64)."""
    if kind == "lora_add":
        return x @ (p["lora_b"] @ p["lora_a"]).T + p["delta_bias"]
    if kind == "lora_mul":
        return x @ (w0 * (p["lora_b"] @ p["lora_a"])).T + b0 * p["bias_scale"]
    if kind == "vpt_add":
        return (w0 @ (p["prompt_down"] @ p["prompt_up"])).squeeze(-1).expand(*x.shape[:-1], -1)
    if kind == "lora_mul_vpt_add":
        db = (w0 @ (p["prompt_down"] @ p["prompt_up"])).squeeze(-1) + b0 * p["bias_scale"]
        return x @ (w0 * (p["lora_b"] @ p["lora_a"])).T + db
    if kind == "rlrr":
        return x @ (w0 * (p["scale_left"] @ p["scale_right"])).T + p["shift"]
    raise AssertionError(kind)


def _randomise(layer):
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn_like(p) * 0.3)


KINDS = ["lora_add", "lora_mul", "vpt_add", "lora_mul_vpt_add", "rlrr"]


@pytest.mark.parametrize("kind", KINDS + ["head"])
@pytest.mark.parametrize("noise_shape,rank", [("sample", 1), ("token", 10), (None, 10)])
def test_kind_matches_spec_forward_and_grads(kind, noise_shape, rank):
    S, T, K, D, sigma = 2, 197, 33, 18, 0.7
    layer = pace.PaceLinear(
        K,
        D,
        adapter=kind,
        rank=rank,
        sigma=sigma if noise_shape else 0.0,
        noise_shape=noise_shape or "sample",
    )
    _randomise(layer)
    x = torch.randn(S, T, K)
    g = torch.randn(S, T, D)

    torch.manual_seed(11)
    y = layer(x.requires_grad_())
    y.backward(g)
    torch.manual_seed(11)  # the layer's noise is its first draw from the default generator
    if noise_shape == "sample":
        z = (torch.randn(S, D) * sigma + 1).double()[:, None, :]
    elif noise_shape == "token":
        z = (torch.randn(S, T, D) * sigma + 1).double()
    else:
        z = torch.ones(1, dtype=torch.float64)

    f64 = {n: p.detach().double().requires_grad_() for n, p in layer.adapter_parameters().items()}
    x64 = x.detach().double().requires_grad_()
    w0, b0 = layer.weight.detach().double(), layer.bias.detach().double()
    if kind == "head":
        y64 = z * (x64 @ f64["weight"].T + f64["bias"])
    else:
        y64 = x64 @ w0.T + b0 + z * _spec_dh(kind, f64, w0, b0, x64)
    y64.backward(g.double())

    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for name, p in layer.adapter_parameters().items():
        ref = f64[name].grad
        torch.testing.assert_close(
            p.grad.double() / ref.abs().max(),
            ref / ref.abs().max(),
            rtol=1e-4,
            atol=1e-4,
            msg=lambda m, n=name: f"grad of {n}: {m}",
        )
    assert layer.weight.grad is None or kind == "head"


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_tensor_names_follow_spec(kind):
    names = set(pace.PaceLinear(8, 6, adapter=kind, rank=2).adapter_parameters())
    expected = {
        "lora_add": {"lora_a", "lora_b", "delta_bias"},
        "lora_mul": {"lora_a", "lora_b", "bias_scale"},
        "vpt_add": {"prompt_down", "prompt_up"},
        "lora_mul_vpt_add": {"lora_a", "lora_b", "prompt_down", "prompt_up", "bias_scale"},
        "rlrr": {"scale_left", "scale_right", "shift"},
    }[kind]
    assert names == expected


@pytest.mark.parametrize("kind", ["lora_add", "lora_mul", "vpt_add", "lora_mul_vpt_add"])
def test_initialisation_leaves_the_pretrained_layer_unchanged(kind):
    base = nn.Linear(20, 12)
    layer = pace.PaceLinear.from_linear(base, adapter=kind, rank=4, sigma=0.5).eval()
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.weight is base.weight and not layer.weight.requires_grad


def test_noise_one_draw_per_sample_and_channel_with_mean_one_and_std_sigma():
    """Seen from outside: with B = 0 and db = 1, ``y - (x W0^T + b0)`` is exactly the noise."""
    torch.manual_seed(1234)
    S, T, K, D, sigma = 512, 7, 6, 40, 0.35
    layer = pace.PaceLinear(K, D, adapter="lora_add", rank=2, sigma=sigma)
    with torch.no_grad():
        layer.delta_bias.fill_(1.0)
    x = torch.randn(S, T, K)
    with torch.no_grad():
        z = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(z, z[:, :1, :].expand_as(z), rtol=0, atol=1e-5)  # shared by the tokens
    per = z[:, 0, :]
    n = per.numel()
    assert abs(per.mean().item() - 1.0) < 4 * sigma / math.sqrt(n)
    assert abs(per.std().item() - sigma) < 0.03 * sigma
    assert per.std(dim=0).min() > 0.8 * sigma  # every channel varies across samples, independently drawn
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x) - nn.functional.linear(x, layer.weight, layer.bias), torch.ones(S, T, D)
        )


def test_ablation_noises():
    torch.manual_seed(0)
    S, D, sigma = 4000, 8, 0.5
    x = torch.randn(S, 1, 5)
    for kind in ("dropout", "gaussian"):
        layer = pace.PaceLinear(5, D, adapter="lora_add", rank=1, sigma=sigma, noise=kind)
        with torch.no_grad():
            layer.delta_bias.fill_(1.0)
            z = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)
        assert abs(z.mean().item() - 1) < 0.03 and abs(z.std().item() - sigma) < 0.03
    layer = pace.PaceLinear(5, D, adapter="lora_add", rank=1, sigma=sigma, noise="additive")
    with torch.no_grad():
        e = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)
    assert abs(e.mean().item()) < 0.03 and abs(e.std().item() - sigma) < 0.03
    layer = pace.PaceLinear(5, D, adapter="lora_add", rank=1, sigma=sigma, noise_on="output")
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(2.0)
        layer.delta_bias.fill_(1.0)
        h = layer(x)  # z * (h + dh) = 3 z
    assert abs(h.mean().item() - 3) < 0.1 and abs(h.std().item() - 3 * sigma) < 0.1


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="adapter must be one of"):
        pace.PaceLinear(4, 4, adapter="lora_sub")
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        pace.PaceLinear(4, 4, sigma=-0.1)
    for rank in (0, -3, 2.5):
        with pytest.raises(ValueError, match="rank must be a positive int"):
            pace.PaceLinear(4, 4, rank=rank)
    with pytest.raises(ValueError, match="noise must be one of"):
        pace.PaceLinear(4, 4, noise="uniform")
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        pace.PaceLinear(0, 4)
    with pytest.raises(TypeError, match="layer must be an nn.Linear"):
        pace.PaceLinear.from_linear(nn.Conv1d(2, 2, 1))
    layer = pace.PaceLinear(4, 3, adapter="lora_add", rank=2)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 4\]"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x has float32|has dtype"):
        pace.PaceLinear(4, 3, adapter="lora_mul", rank=2)(torch.randn(2, 4, dtype=torch.float64))
