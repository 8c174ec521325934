"""Checkpoint files: atomic writes, random-state round trips, reading weights (.pth, .safetensors, .npz)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pace.train.checkpoint import atomic_save, atomic_write, capture_rng, read_state_dict, restore_rng
from pace.train.model import load_checkpoint


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1}, path)

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    atomic_save(capture_rng(g), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(10, generator=g))
    torch.manual_seed(9), np.random.seed(9), random.seed(9), g.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), g)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(10, generator=g))
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and torch.equal(expected[3], got[3])


def test_read_state_dict_unwraps_training_checkpoints(tmp_path):
    sd = {"module.a": torch.ones(2), "module.b": torch.zeros(1)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pth")
    assert set(read_state_dict(tmp_path / "w.pth")) == {"a", "b"}
    save_file({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a"], torch.ones(2))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="must end in"):
        read_state_dict(tmp_path / "w.txt")


def _tiny_vit(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=num_classes,
    )


def _save_original_vit_npz(model, path):
    """Write a timm ViT in the layout of the original (Google) ViT release."""
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    n = lambda t: t.detach().numpy()  # noqa: E731
    w = {
        "embedding/kernel": n(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": n(model.patch_embed.proj.bias),
        "cls": n(model.cls_token),
        "Transformer/posembed_input/pos_embedding": n(model.pos_embed),
        "Transformer/encoder_norm/scale": n(model.norm.weight),
        "Transformer/encoder_norm/bias": n(model.norm.bias),
        "head/kernel": n(model.head.weight.T),
        "head/bias": n(model.head.bias),
    }
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = n(blk.norm1.weight), n(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = n(blk.norm2.weight), n(blk.norm2.bias)
        for j, name in enumerate(("query", "key", "value")):
            wq = blk.attn.qkv.weight[j * d : (j + 1) * d]
            w[mha + name + "/kernel"] = n(wq.T.reshape(d, heads, d // heads))
            w[mha + name + "/bias"] = n(blk.attn.qkv.bias[j * d : (j + 1) * d].reshape(heads, d // heads))
        w[mha + "out/kernel"] = n(blk.attn.proj.weight.reshape(d, heads, d // heads).permute(1, 2, 0))
        w[mha + "out/bias"] = n(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = n(fc.weight.T)
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = n(fc.bias)
    np.savez(path, **w)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_load_checkpoint_formats(tmp_path, fmt):
    src = _tiny_vit(num_classes=7, seed=1)  # another task's head: it must be left alone
    path = tmp_path / f"vit.{fmt}"
    if fmt == "npz":
        _save_original_vit_npz(src, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    dst = _tiny_vit(num_classes=3, seed=2)
    head_before = dst.head.weight.clone()
    load_checkpoint(dst, str(path))
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for k, v in dst_sd.items():
        if not k.startswith("head."):
            torch.testing.assert_close(v, src_sd[k], msg=k)
    assert torch.equal(dst.head.weight, head_before)


def test_npz_needs_a_vit(tmp_path):
    _save_original_vit_npz(_tiny_vit(), tmp_path / "vit.npz")
    cnn = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="not a ViT"):
        load_checkpoint(cnn, str(tmp_path / "vit.npz"))
