"""Adapter save / load with safetensors + JSON, re-applied to a fresh model."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import pace


def _model():
    torch.manual_seed(0)  # the same "pre-trained" weights every call
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=2)


def test_save_and_reapply_to_fresh_model(tmp_path):
    model = pace.inject(_model(), adapter="rlrr", sigma=0.3)
    with torch.no_grad():
        for p in pace.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    path = pace.save_adapter(model, tmp_path / "adapter")
    assert path.name == "adapter.safetensors" and (tmp_path / "adapter.json").is_file()
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["config"]["adapter"] == "rlrr" and meta["config"]["sigma"] == 0.3
    assert "blocks.0.attn.qkv.scale_left" in meta["tensors"] and "head.weight" in meta["tensors"]
    assert not any(name.endswith("qkv.weight") for name in meta["tensors"])  # frozen weights stay out

    fresh = pace.load_adapter(_model(), tmp_path / "adapter.safetensors")
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert fresh.blocks[1].attn.qkv.sigma == model.blocks[1].attn.qkv.sigma
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pace.load_adapter(_model(), tmp_path / "missing")
    with pytest.raises(ValueError, match="call pace.inject first"):
        pace.save_adapter(_model(), tmp_path / "x")
    model = pace.inject(_model(), adapter="lora_add", rank=2)
    pace.save_adapter(model, tmp_path / "a")
    other = pace.inject(_model(), adapter="lora_add", rank=3)
    with pytest.raises(ValueError, match="has shape"):
        pace.load_adapter(other, tmp_path / "a")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a PACE adapter config"):
        pace.load_adapter(_model(), tmp_path / "a")


def test_load_refuses_a_file_that_misses_trainable_tensors(tmp_path):
    model = pace.inject(_model(), adapter="lora_add", rank=2)
    pace.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    del tensors["blocks.1.mlp.fc2.lora_b"]
    save_file(tensors, str(tmp_path / "a.safetensors"))
    msg = r"holds no tensors for the model's trainable \['blocks.1.mlp.fc2.lora_b'\]"
    with pytest.raises(ValueError, match=msg):
        pace.load_adapter(_model(), tmp_path / "a")


def test_atomic_writes_give_the_mode_open_would(tmp_path):
    # mkstemp makes its files 0600; a saved adapter is meant to be shared like any file written
    # with open(), so it gets 0666 less the umask.
    import os

    old = os.umask(0o022)
    try:
        pace.save_adapter(pace.inject(_model(), adapter="lora_add"), tmp_path / "adapter")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"adapter.safetensors": 0o644, "adapter.json": 0o644}
