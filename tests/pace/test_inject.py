"""Injection into timm ViT / Swin and any nn.Module, the depth schedule, merge (docs/design.md 4, 6)."""

import pytest
import timm
import torch
import torch.nn as nn

import pace


def _perturb_adapters(model, scale=0.02):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pace.trainable_parameters(model):
            p.add_(torch.randn_like(p) * scale)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def vit_b():
    # ViT-B/16 (12 blocks, 768 wide); a 32x32 input keeps the test fast on CPU.
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=7, img_size=32, drop_path_rate=0.1
    )


def test_vit_b_inject_schedule_init_and_merge(vit_b):
    model = vit_b.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y_orig = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    sigma = 0.6
    pace.inject(model, adapter="lora_mul_vpt_add", rank=10, sigma=sigma)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)}
    assert sorted(layers) == sorted(linear_names)
    assert len(layers) == 12 * 4 + 1
    for j in range(12):
        for suffix in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            layer = layers[f"blocks.{j}.{suffix}"]
            assert layer.adapter == "lora_mul_vpt_add"
            assert layer.sigma == pytest.approx(0.0 if j == 0 else sigma * (13 - j) / 12)
    assert layers["head"].adapter == "head" and layers["head"].sigma == pytest.approx(sigma / 12)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "blocks.0.attn.qkv.lora_a" in trainable
    assert "blocks.0.attn.qkv.weight" not in trainable and "patch_embed.proj.weight" not in trainable
    assert not any(type(m).__name__ == "DropPath" for m in model.modules())
    assert isinstance(model.blocks[5].drop_path1, pace.SharedDropPath)

    with torch.no_grad():
        y_init = model(x)
    torch.testing.assert_close(y_init, y_orig, rtol=0, atol=1e-6)

    _perturb_adapters(model)
    with torch.no_grad():
        y_adapted = model(x)
    assert _rel(y_adapted, y_orig) > 1e-3  # the adapters do something
    pace.merge(model)
    assert not any(isinstance(m, pace.PaceLinear) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        y_merged = model(x)
    assert _rel(y_merged, y_adapted) < 1e-4


def test_swin_inject_schedule_and_merge():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y_orig = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    pace.inject(model, adapter="lora_add", rank=4, sigma=1.0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)}
    assert "head.fc" in layers and layers["head.fc"].adapter == "head"
    # Swin: no noise-free block; a layer between blocks shares the index of the block after it.
    assert layers["layers.0.blocks.0.attn.qkv"].sigma > 0
    assert (
        layers["layers.1.downsample.reduction"].block_index == layers["layers.1.blocks.0.mlp.fc1"].block_index
    )
    n = len({m.block_index for m in layers.values()})
    assert layers["head.fc"].block_index == n - 1
    assert layers["layers.0.blocks.0.attn.qkv"].sigma == pytest.approx(1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_orig, rtol=0, atol=1e-5)
    _perturb_adapters(model)
    with torch.no_grad():
        y_adapted = model(x)
    pace.merge(model)
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        assert _rel(model(x), y_adapted) < 1e-4


def test_block_indices_and_schedules():
    names = ["blocks.0.fc", "blocks.1.fc", "layers.1.downsample.reduction", "head"]
    idx = pace.block_indices(
        [
            "layers.0.blocks.0.fc",
            "layers.0.blocks.1.fc",
            "layers.1.downsample.reduction",
            "layers.1.blocks.0.fc",
            "head.fc",
        ],
        head="head.fc",
    )
    assert idx == {
        "layers.0.blocks.0.fc": 0,
        "layers.0.blocks.1.fc": 1,
        "layers.1.downsample.reduction": 2,
        "layers.1.blocks.0.fc": 2,
        "head.fc": 3,
    }
    assert pace.block_indices(names, head="head")["head"] == 2
    assert pace.schedule_factors(13, 1, "pace") == pytest.approx([0] + [(13 - j) / 12 for j in range(1, 13)])
    assert pace.schedule_factors(4, 0, "constant") == [1.0] * 4
    assert pace.schedule_factors(4, 1, "increasing") == pytest.approx([0, 1 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match="schedule must be one of"):
        pace.schedule_factors(4, 1, "random")


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList(
            [nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12)) for _ in range(3)]
        )
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        for block in self.encoder:
            x = x + block(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("kind", ["lora_add", "lora_mul", "vpt_add", "lora_mul_vpt_add", "rlrr"])
def test_generic_module_targets_and_merge_every_kind(kind):
    model = _Mlp().eval()
    n_params = sum(p.numel() for p in model.parameters())
    pace.inject(model, adapter=kind, rank=3, sigma=0.2, targets=["0"])  # PEFT-style: names ending in ".0"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)}
    assert sorted(layers) == ["encoder.0.0", "encoder.1.0", "encoder.2.0", "head"]
    assert isinstance(model.encoder[0][2], nn.Linear) and not isinstance(model.encoder[0][2], pace.PaceLinear)
    if kind == "rlrr":
        assert isinstance(model.norm, pace.SSFNorm)
    _perturb_adapters(model, 0.2)
    x = torch.randn(5, 2, 12)
    with torch.no_grad():
        y = model(x)
    pace.merge(model)
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        assert _rel(model(x), y) < 1e-5


def test_regex_targets_and_bad_arguments():
    model = _Mlp()
    pace.inject(model, adapter="lora_add", targets=r"encoder\.[01]\.2", head=None)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)) == [
        "encoder.0.2",
        "encoder.1.2",
    ]
    with pytest.raises(ValueError, match="already holds PaceLinear"):
        pace.inject(model)
    for kwargs, msg in (
        (dict(adapter="dora"), "adapter must be one of"),
        (dict(rank=0), "rank must be a positive int"),
        (dict(sigma=-1.0), "sigma must be a finite number"),
        (dict(targets=["nothing"], head=None), "no nn.Linear layer of the model matches"),
        (dict(head="norm"), "does not name an nn.Linear"),
        (dict(schedule="linear"), "schedule must be one of"),
    ):
        with pytest.raises(ValueError, match=msg):
            pace.inject(_Mlp(), **kwargs)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pace.inject("vit")


def test_set_sigma_reapplies_schedule_and_adapters_disabled():
    model = _Mlp()
    pace.inject(model, adapter="lora_add", sigma=1.0, noise_free_blocks=1)
    pace.set_sigma(model, 0.5)
    sig = {n: m.sigma for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)}
    # keys (0,0) (0,2) (1,0) (1,2) (2,0) (2,2) and the head: n = 7, the first index noise-free
    assert sig["encoder.0.0"] == 0.0 and sig["encoder.1.0"] == pytest.approx(0.5 * 5 / 6)
    assert sig["head"] == pytest.approx(0.5 / 6)
    _perturb_adapters(model, 0.3)
    model.eval()
    x = torch.randn(3, 12)
    with pace.adapters_disabled(model):
        y_off = model(x)
    assert pace.fp_distance(model, x).item() > 0
    merged_head_only = _Mlp()
    merged_head_only.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "lora" not in k and "delta_bias" not in k}
    )
    torch.testing.assert_close(y_off, merged_head_only(x))
