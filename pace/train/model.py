"""Building the network: a timm model, optional pre-trained weights, PACE adapters."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch.nn as nn

import pace

from .checkpoint import read_state_dict, short_reason


def create_timm_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    drop_path: float = 0.0,
    img_size: Optional[int] = None,
    kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:12]}*")[:3]
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    sized = {} if img_size is None else {"img_size": img_size}
    kw: Dict[str, Any] = {"drop_path_rate": drop_path, **sized, **(kwargs or {})}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kw)
    except TypeError as exc:
        raise ValueError(f"{name}: bad model arguments {sorted(kw)} ({short_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - hub/network/config errors of many kinds
        what = "cannot load the pre-trained weights" if pretrained else "cannot create it"
        raise ValueError(f"{name}: {what} ({short_reason(exc)})") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    size = kw.get("img_size")
    if patch is not None and isinstance(size, int) and size < max(patch):
        raise ValueError(f"{name}: image size {size} is below the model's patch size {max(patch)}")
    return model


def load_checkpoint(model: nn.Module, path: str, allow_partial: bool = False) -> str:
    """Load a ViT ``.npz``, ``.safetensors`` or ``.pth`` into ``model`` and return a one-line summary; a
    classifier of another shape stays as initialised, any other tensor left so needs ``allow_partial``."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no file at {p}")
    if p.suffix.lower() == ".npz":
        if not isinstance(model, VisionTransformer):
            kind = type(model).__name__
            raise ValueError(f".npz files hold the original ViT release layout; {kind} is not a ViT")
        from timm.models.vision_transformer import _load_weights  # private: imported only where needed

        try:
            _load_weights(model, str(p))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot load {p} into the model ({short_reason(exc)})") from None
        return f"loaded {p.name} (ViT .npz)"

    state = read_state_dict(p)
    if isinstance(model, VisionTransformer):  # resamples position embeddings, maps old names
        with contextlib.suppress(Exception):  # best effort; plain matching below still works
            state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{p} holds no tensor that fits {type(model).__name__} (wrong model?)")
    skipped = sorted(k for k in own if k not in usable)
    backbone_skipped = [k for k in skipped if not _is_classifier(model, k)]
    if backbone_skipped and not allow_partial:
        raise ValueError(
            f"{p} fits only {len(usable)} of the model's {len(own)} tensors; {len(backbone_skipped)} "
            f"backbone tensor(s) would stay random, e.g. {', '.join(backbone_skipped[:3])} (wrong model? "
            "allow a partial load explicitly to go on)"
        )
    model.load_state_dict(usable, strict=False)
    note = f"loaded {len(usable)}/{len(own)} tensors from {p.name}"
    if skipped:
        note += f"; left as initialised: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}"
    return note


def _is_classifier(model: nn.Module, key: str) -> bool:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {f"{n}." for n, m in model.named_modules() if m is head and n}
    return any(key.startswith(n) for n in names) or key.startswith("head.")


def add_adapters(model: nn.Module, adapter: str, rank: int, sigma: float, backend: str) -> nn.Module:
    return pace.inject(model, adapter=adapter, rank=rank, sigma=sigma, head="auto", backend=backend)


def count_parameters(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{train:,} trainable of {total:,} parameters"
