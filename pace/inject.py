"""Putting PACE layers into a model, the depth schedule of the noise, and merging for inference."""

from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from pace_kernels._checks import check_backend

from .dropout import SharedDropout, SharedDropPath, reused_masks
from .layers import ADAPTER_KINDS, PaceLinear, SSFNorm, check_sigma
from .noise import check_noise_kind

__all__ = [
    "SCHEDULES",
    "inject",
    "merge",
    "set_sigma",
    "set_backend",
    "trainable_parameters",
    "adapters_disabled",
    "fp_distance",
    "block_indices",
    "schedule_factors",
]

SCHEDULES = ("pace", "constant", "increasing")
Targets = Union[None, str, Sequence[str]]


def _matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a regex matched against the full module name; a list holds names
    matched exactly or as the last dotted parts (``"qkv"`` matches ``blocks.0.attn.qkv``)."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the module called ``name``, in the train/eval mode of the one it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


def _find_head(model: nn.Module, head: Optional[str]) -> Optional[str]:
    if head is None:
        return None
    modules = dict(model.named_modules())
    if head != "auto":
        if not isinstance(modules.get(head), nn.Linear):
            raise ValueError(f"head={head!r} does not name an nn.Linear of the model")
        return head
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm models know their classifier
        clf = get_classifier()
        for name, m in modules.items():
            if m is clf and isinstance(m, nn.Linear):
                return name
        return None
    heads = [n for n, m in modules.items() if isinstance(m, nn.Linear) and "head" in n.split(".")]
    return heads[-1] if heads else None


def block_indices(names: Sequence[str], head: Optional[str]) -> Dict[str, int]:
    """SPEC section 4: a layer's key is the tuple of the numeric parts of its path, zero-padded to
    the longest key (so a layer between blocks shares the index of the block that follows it); the
    head's key is +inf; indices are the ranks of the distinct sorted keys."""
    keys: Dict[str, Tuple[float, ...]] = {}
    for name in names:
        keys[name] = (
            (float("inf"),) if name == head else tuple(int(t) for t in name.split(".") if t.isdigit())
        )
    width = max((len(k) for k in keys.values()), default=0)
    padded = {n: k + (0,) * (width - len(k)) for n, k in keys.items()}
    rank = {k: i for i, k in enumerate(sorted(set(padded.values())))}
    return {n: rank[k] for n, k in padded.items()}


def schedule_factors(n: int, noise_free: int, schedule: str = "pace") -> List[float]:
    """The sigma multiplier of each block index ``0 .. n-1``: the first ``noise_free`` get 0; index
    ``i`` gets ``(n - i) / (n - s0)`` (PACE: decreasing with depth), 1 (constant), or
    ``(i - s0 + 1) / (n - s0)`` (increasing), the paper's ablations."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    span = n - noise_free
    out = []
    for i in range(n):
        if i < noise_free or span <= 0:
            out.append(0.0)
        elif schedule == "pace":
            out.append((n - i) / span)
        elif schedule == "constant":
            out.append(1.0)
        else:
            out.append((i - noise_free + 1) / span)
    return out


def _share_stochastic_layers(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):
            _set_submodule(model, name, SharedDropPath(m.drop_prob, getattr(m, "scale_by_keep", True)))
        elif type(m) is nn.Dropout and m.p > 0:
            _set_submodule(model, name, SharedDropout(m.p))


def inject(
    model: nn.Module,
    adapter: str = "lora_mul_vpt_add",
    rank: int = 10,
    sigma: float = 0.0,
    targets: Targets = None,
    *,
    schedule: str = "pace",
    noise_free_blocks: Optional[int] = None,
    head: Optional[str] = "auto",
    noise: str = "gaussian",
    noise_on: str = "delta",
    noise_shape: str = "sample",
    backend: str = "auto",
) -> nn.Module:
    """Replace the linear layers of ``model`` in place with :class:`PaceLinear` layers.

    Every ``nn.Linear`` (or those matching ``targets``, PEFT-style) gets ``adapter``; the classifier
    (``head="auto"``: timm's ``get_classifier()``, else the last linear named ``head``; ``None``: no
    head) becomes a trainable ``"head"`` layer; every other parameter is frozen. Each layer's sigma
    follows the depth schedule of SPEC section 4 with the first ``noise_free_blocks`` indices
    noise-free (default: 1 when the model has ViT-style ``blocks``, else 0, as for Swin). DropPath
    and dropout layers are replaced by versions that share masks across PACE copies. For
    ``adapter="rlrr"`` every LayerNorm gets SSF's scale and shift.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if adapter not in ADAPTER_KINDS or adapter == "head":
        raise ValueError(
            f"adapter must be one of {tuple(k for k in ADAPTER_KINDS if k != 'head')}, got {adapter!r}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    sigma = check_sigma(sigma)
    check_noise_kind(noise)
    check_backend(backend)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if any(isinstance(m, PaceLinear) for m in model.modules()):
        raise ValueError("model already holds PaceLinear layers: inject once (pace.merge first to re-inject)")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"targets={targets!r} is not a valid regular expression ({exc})") from None
    if targets is not None and not isinstance(targets, str):
        targets = list(targets)

    head_name = _find_head(model, head)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (n == head_name or _matches(n, targets))
    ]
    if not names:
        raise ValueError(f"no nn.Linear layer of the model matches targets={targets!r}")
    if noise_free_blocks is None:
        noise_free_blocks = 1 if hasattr(model, "blocks") and not hasattr(model, "layers") else 0
    index = block_indices(names, head_name)
    n_idx = len(set(index.values()))
    factors = schedule_factors(n_idx, noise_free_blocks, schedule)

    model.requires_grad_(False)
    layer_kw = dict(rank=rank, noise=noise, noise_on=noise_on, noise_shape=noise_shape, backend=backend)
    for name in names:
        linear = model.get_submodule(name)
        kind = "head" if name == head_name else adapter
        layer = PaceLinear.from_linear(linear, adapter=kind, **layer_kw)
        layer.block_index = index[name]
        layer.noise_scale = factors[index[name]]
        layer.sigma = sigma * layer.noise_scale
        _set_submodule(model, name, layer)
    if adapter == "rlrr":
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                _set_submodule(model, name, SSFNorm(m, m.normalized_shape[-1]))
    _share_stochastic_layers(model)
    model.pace_config = {
        "adapter": adapter,
        "rank": rank,
        "sigma": sigma,
        "targets": targets,
        "schedule": schedule,
        "noise_free_blocks": noise_free_blocks,
        "head": head_name,
        "noise": noise,
        "noise_on": noise_on,
        "noise_shape": noise_shape,
    }
    return model


def _pace_layers(model: nn.Module) -> Iterator[PaceLinear]:
    return (m for m in model.modules() if isinstance(m, PaceLinear))


def set_sigma(model: nn.Module, sigma: float) -> None:
    """Re-apply the depth schedule set by :func:`inject` with a new base ``sigma``."""
    sigma = check_sigma(sigma)
    for m in _pace_layers(model):
        m.sigma = sigma * getattr(m, "noise_scale", 1.0)
    if isinstance(getattr(model, "pace_config", None), dict):
        model.pace_config["sigma"] = sigma


def set_backend(model: nn.Module, backend: str) -> None:
    """Pick the backend (``"auto"``, ``"triton"``, ``"torch"``) of every PaceLinear."""
    check_backend(backend)
    for m in _pace_layers(model):
        m.backend = backend


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the pre-trained network: every adapter's ``dh`` (and SSF) off and no noise.
    The classifier head is kept as it is, since the pre-trained model has none for the new task."""
    switched = [
        m
        for m in model.modules()
        if isinstance(m, (PaceLinear, SSFNorm)) and getattr(m, "adapter", "") != "head"
    ]
    before = [m.adapter_enabled for m in switched]
    for m in switched:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(switched, before):
            m.adapter_enabled = was


def fp_distance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FP-distance of the PACE paper (Eq. 5): ``mean_b sum_c (f(x) - f_pretrained(x))^2``,
    without gradient, in the model's current mode (call it in eval mode for a noise-free value; in
    train mode both passes see the same DropPath masks)."""
    with torch.no_grad(), reused_masks(model):
        f = model(x)
        with adapters_disabled(model):
            f0 = model(x)
        return (f.float() - f0.float()).square().sum(-1).mean()


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into plain layers in place (SPEC section 6): PaceLinear -> nn.Linear,
    SSF into its LayerNorm's affine. The merged model's eval output equals the adapted model's."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PaceLinear):
            _set_submodule(model, name, m.to_linear())
        elif isinstance(m, SSFNorm):
            _set_submodule(model, name, m.merged())
    if hasattr(model, "pace_config"):
        del model.pace_config
    return model
