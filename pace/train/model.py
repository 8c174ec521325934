"""Building the network: a timm model, optional pre-trained weights, PACE adapters."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

import pace

from .checkpoint import _short, read_state_dict
from .errors import UsageError


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
        raise UsageError(f"--model: unknown timm model {name!r}{hint}")
    kw: Dict[str, Any] = dict(kwargs or {})
    kw.setdefault("drop_path_rate", drop_path)
    if img_size is not None:
        kw.setdefault("img_size", img_size)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kw)
    except TypeError as exc:
        raise UsageError(f"--model {name}: bad model arguments {sorted(kw)} ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - hub/network/config errors of many kinds
        what = "cannot load the pre-trained weights" if pretrained else "cannot create it"
        raise UsageError(f"--model {name}: {what} ({_short(exc)})") from None


def load_checkpoint(model: nn.Module, path: str) -> str:
    """Load pre-trained weights into ``model``: the original ViT release's ``.npz`` (timm's own
    loader), ``.safetensors`` or ``.pth`` (``weights_only=True``). A classifier whose shape differs
    (a new task) is left as initialised. Returns a one-line summary."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--checkpoint: no file at {p}")
    if p.suffix.lower() == ".npz":
        from timm.models.vision_transformer import VisionTransformer, _load_weights

        if not isinstance(model, VisionTransformer):
            raise UsageError(
                f"--checkpoint: .npz files hold the original ViT release layout; "
                f"{type(model).__name__} is not a ViT"
            )
        try:
            _load_weights(model, str(p))
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--checkpoint: cannot load {p} into the model ({_short(exc)})") from None
        return f"loaded {p.name} (ViT .npz)"

    state = read_state_dict(p)
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):  # resamples position embeddings, maps old names
            state = checkpoint_filter_fn(state, model)
    except Exception:  # noqa: BLE001 - best effort; plain matching below still works
        pass
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UsageError(f"--checkpoint: {p} holds no tensor that fits {type(model).__name__} (wrong model?)")
    model.load_state_dict(usable, strict=False)
    skipped = sorted(k for k in own if k not in usable)
    note = f"loaded {len(usable)}/{len(own)} tensors from {p.name}"
    if skipped:
        note += f"; left as initialised: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}"
    return note


def add_adapters(model: nn.Module, adapter: str, rank: int, sigma: float, backend: str) -> nn.Module:
    try:
        return pace.inject(model, adapter=adapter, rank=rank, sigma=sigma, head="auto", backend=backend)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--adapter {adapter}: {_short(exc)}") from None


def count_parameters(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{train:,} trainable of {total:,} parameters"


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
