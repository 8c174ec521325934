"""The memory contract under autocast (issue 10, item 5): the fused path saves no ``D x K`` tensor
for backward, with fp32 master weights and bf16 autocast as with plain fp32. Without a GPU the
kernels run in Triton's interpreter under CPU autocast; on a CUDA machine, on the GPU.

Counted with saved-tensor hooks, de-duplicated by storage, as docs/design.md section 8 counts. A storage of
the model's own parameters costs nothing new (the parameter is alive anyway); every other saved
storage is memory the step keeps from forward to backward, and none of it may have the shape of a
layer's weight.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import pace
from pace import PaceLinear

AMP = torch.bfloat16


def _saved_storages(module: nn.Module, x: torch.Tensor, autocast: bool) -> dict[int, tuple]:
    """``{storage pointer: (bytes, shape, dtype)}`` of what one forward of ``module`` saves for
    backward, leaving out the storages of ``module``'s parameters; the backward is run too, so a
    saved tensor the backward cannot use would fail there."""
    own = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved.setdefault(ptr, (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=AMP, enabled=autocast):
            y = module(x)
    y.float().square().sum().backward()
    return saved


def _weight_shapes(module: nn.Module) -> set[tuple[int, int]]:
    shapes = set()
    for m in module.modules():
        if isinstance(m, PaceLinear):
            shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    return shapes


def _assert_no_weight_sized(saved: dict[int, tuple], module: nn.Module, label: str) -> None:
    shapes = _weight_shapes(module)
    offending = [(shape, dtype, nbytes) for nbytes, shape, dtype in saved.values() if shape in shapes]
    total = sum(nbytes for nbytes, _, _ in saved.values())
    assert not offending, f"{label}: saved D x K tensors {offending} ({total} bytes saved in all)"


def _layer(adapter: str, device: str) -> PaceLinear:
    torch.manual_seed(0)
    layer = PaceLinear(96, 80, adapter=adapter, rank=4, sigma=0.5, backend="triton", device=device).train()
    with torch.no_grad():  # B != 0, so every adapter gradient is non-trivial
        for p in layer.adapter_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("adapter", ["lora_mul_vpt_add", "lora_add"])
def test_pace_linear_saves_no_weight_sized_tensor_under_autocast(adapter: str, device: str) -> None:
    x = torch.randn(2, 5, 96, device=device, requires_grad=True)  # 10 rows: smaller than 80 x 96
    layer = _layer(adapter, device)
    _assert_no_weight_sized(_saved_storages(layer, x, autocast=False), layer, f"{adapter} fp32")
    _assert_no_weight_sized(_saved_storages(layer, x, autocast=True), layer, f"{adapter} bf16 autocast")


@pytest.mark.parametrize("adapter", ["lora_mul_vpt_add", "lora_add"])
def test_autocast_keeps_the_layer_exact(adapter: str, device: str) -> None:
    """The fused path under autocast still gives the reference's output and gradients."""
    x = torch.randn(2, 5, 96, device=device)
    layer = _layer(adapter, device)
    results = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        torch.manual_seed(3)  # the same noise draws
        with torch.autocast(device, dtype=AMP):
            y = layer(x)
        params = list(layer.adapter_parameters().values())
        results[backend] = (y.float(), torch.autograd.grad(y.float().square().sum(), params))
    (y_k, g_k), (y_r, g_r) = results["triton"], results["torch"]
    scale = y_r.abs().max().item()
    torch.testing.assert_close(y_k, y_r, rtol=2e-2, atol=2e-2 * scale)
    for a, b in zip(g_k, g_r):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


def test_injected_vit_block_saves_no_weight_sized_tensor_under_autocast(device: str) -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=32,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    pace.inject(model, adapter="lora_mul_vpt_add", rank=4, sigma=0.5, backend="triton")
    block = model.blocks[1].to(device).train()  # block 1: noisy under the PACE schedule
    x = torch.randn(
        2, 5, 32, device=device, requires_grad=True
    )  # 10 rows x 128 hidden < the 32 x 128 weights
    _assert_no_weight_sized(_saved_storages(block, x, autocast=False), block, "ViT block fp32")
    _assert_no_weight_sized(_saved_storages(block, x, autocast=True), block, "ViT block bf16 autocast")
