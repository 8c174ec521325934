"""Putting PACE layers into a model, the depth schedule of the noise, and merging for inference."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import pace_kernels

from .config import SCHEDULES, Heads, PaceConfig, Targets, check_sigma
from .dropout import SharedDropout, SharedDropPath, reused_masks
from .hf import find_hf_head, hf_output_layers, is_hf_model
from .layers import PaceHead, PaceLinear, SSFNorm, layer_class

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


def _head_linears(model: nn.Module, name: str, modules: Dict[str, nn.Module]) -> List[str]:
    """``name`` itself when it is a linear layer, else every linear layer inside the module ``name``."""
    module = modules.get(name)
    if isinstance(module, nn.Linear):
        return [name]
    linears = (
        []
        if module is None
        else [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    )
    if not linears:
        raise ValueError(
            f"head={name!r} does not name an nn.Linear of the model, nor a module holding nn.Linear layers"
        )
    return linears


def _find_head(model: nn.Module, head: Heads) -> List[str]:
    """The names of the linear layers that become trainable ``"head"`` layers."""
    if head is None:
        return []
    modules = dict(model.named_modules())
    if head != "auto":
        names = [head] if isinstance(head, str) else list(head)
        return list(dict.fromkeys(lin for n in names for lin in _head_linears(model, n, modules)))
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm models know their classifier
        clf = get_classifier()
        return [name for name, m in modules.items() if m is clf and isinstance(m, nn.Linear)][:1]
    if is_hf_model(model):
        return find_hf_head(model)
    heads = [n for n, m in modules.items() if isinstance(m, nn.Linear) and "head" in n.split(".")]
    return heads[-1:]


def block_indices(names: Sequence[str], head: Heads) -> Dict[str, int]:
    """docs/design.md section 4: a layer's key is the tuple of the numeric parts of its path, zero-padded to
    the longest key (so a layer between blocks shares the index of the block that follows it); the
    head's key is +inf (``head``: one name or several, all sharing the last index); indices are the
    ranks of the distinct sorted keys."""
    heads = {head} if isinstance(head, str) else set(head or ())
    keys: Dict[str, Tuple[float, ...]] = {}
    for name in names:
        keys[name] = (
            (float("inf"),) if name in heads else tuple(int(t) for t in name.split(".") if t.isdigit())
        )
    width = max((len(k) for k in keys.values()), default=0)
    padded = {n: k + (0,) * (width - len(k)) for n, k in keys.items()}
    rank = {k: i for i, k in enumerate(sorted(set(padded.values())))}
    return {n: rank[k] for n, k in padded.items()}


_NORM_CLASS_NAME = re.compile(r"(layer|rms)_?norm", re.IGNORECASE)


def _affine_norm_width(m: nn.Module) -> Optional[int]:
    """The channel count of a norm layer with a per-channel weight that SSF can follow: LayerNorm,
    RMSNorm (torch's, or a model's own such as ``LlamaRMSNorm``: recognised by a class name with
    ``LayerNorm``/``RMSNorm`` and a 1-d ``weight``); ``None`` for anything else."""
    if isinstance(m, SSFNorm):
        return None
    weight = getattr(m, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1:
        return None  # no affine weight (elementwise_affine=False) or not a per-channel norm
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return weight.shape[0]
    return weight.shape[0] if _NORM_CLASS_NAME.search(type(m).__name__) else None


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


def _is_replaced(m: nn.Module) -> bool:
    """The stochastic layers inject swaps for mask-sharing versions."""
    return (type(m).__name__ == "DropPath" and hasattr(m, "drop_prob")) or type(m) is nn.Dropout


def _share_stochastic_layers(model: nn.Module, non_fused: List[nn.Module]) -> None:
    """Swap DropPath and dropout for versions that share their masks across the PACE copies; the
    attention modules of ``non_fused`` take their non-fused path, which calls the shared dropout."""
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):
            _set_submodule(model, name, SharedDropPath(m.drop_prob, getattr(m, "scale_by_keep", True)))
        elif type(m) is nn.Dropout and m.p > 0:
            _set_submodule(model, name, SharedDropout(m.p))
    for m in non_fused:
        m.fused_attn = False


_SOURCE_CACHE: Dict[type, Optional[str]] = {}


def _class_source(cls: type) -> Optional[str]:
    """The source of ``cls`` and its bases below nn.Module (None where Python has none)."""
    if cls not in _SOURCE_CACHE:
        parts: Optional[List[str]] = []
        for klass in cls.__mro__:
            if klass is object or klass.__module__.startswith("torch.nn"):
                continue
            try:
                parts.append(inspect.getsource(klass))
            except (OSError, TypeError):
                parts = None
                break
        _SOURCE_CACHE[cls] = None if parts is None else "\n".join(parts)
    return _SOURCE_CACHE[cls]


def _reads(source: Optional[str], expr: str) -> bool:
    """Whether ``source`` reads ``expr`` (an assignment to it does not count); unknown source: yes."""
    return source is None or re.search(re.escape(expr) + r"\b(?!\s*=[^=])", source) is not None


def _config_keys(module: nn.Module, p: float) -> List[str]:
    """Keys of a Hugging Face style ``module.config`` that hold this dropout probability."""
    config = getattr(module, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return []
    keys = [k for k, v in to_dict().items() if "drop" in k and isinstance(v, float) and abs(v - p) < 1e-9]
    if "attention" in type(module).__name__.lower():  # several keys can hold the same value
        keys.sort(key=lambda k: "att" not in k)
    return keys


def _fix(module: nn.Module, p: float, setting: str) -> str:
    keys = _config_keys(module, p)
    return f"build the model with config.{keys[0]}=0" if keys else f"set {setting} = 0"


def _refusal(name: str, what: str, fix: str) -> ValueError:
    return ValueError(
        f"pace.inject: module {name!r} {what}; its mask cannot be shared across the PACE copies, so "
        f"they would differ even at sigma 0. Fix: {fix}."
    )


def _plan_dropout_sharing(model: nn.Module) -> List[nn.Module]:
    """Check, before anything changes, that every dropout of ``model`` can be shared across the
    copies; return the timm attention modules to switch to their non-fused path. Refused with a
    ValueError naming the module and the fix: Hugging Face attention functions (``dropout=
    self.dropout.p`` or ``self.attention_dropout``), functional dropout from a float attribute,
    and dropout layers of other kinds (Dropout2d, PatchDropout, DropBlock)."""
    non_fused = []
    for name, m in model.named_modules():
        name = name or type(model).__name__
        if _is_replaced(m) or isinstance(m, (SharedDropout, SharedDropPath)) or hasattr(m, "pace_copies"):
            continue
        if "drop" in type(m).__name__.lower():
            for attr, v in vars(m).items():
                if isinstance(v, float) and 0 < v <= 1 and not attr.startswith("_"):
                    raise _refusal(
                        name,
                        f"is a {type(m).__name__} with {attr}={v:g} (of dropout layers only "
                        "nn.Dropout and DropPath are shared)",
                        f"set {name}.{attr} = 0",
                    )
            continue
        source = _class_source(type(m))
        switch = False
        for child_name, child in m.named_children():
            p = getattr(child, "p", 0.0)
            if not (type(child) in (nn.Dropout, SharedDropout) and p > 0):
                continue
            if not _reads(source, f"self.{child_name}.p"):
                continue
            if isinstance(getattr(m, "fused_attn", None), bool) and _reads(source, f"self.{child_name}("):
                switch = True  # timm attention: the non-fused path calls the dropout module
                continue
            raise _refusal(
                name,
                f"passes {child_name}.p={p:g} to an attention function instead of calling {child_name} "
                "(attention dropout inside fused or Hugging Face attention functions)",
                _fix(m, p, f"{name}.{child_name}.p"),
            )
        if switch:
            non_fused.append(m)
            continue  # timm keeps float copies of the probability for the fused path only
        for attr, v in vars(m).items():
            if (
                "drop" in attr.lower()
                and isinstance(v, float)
                and 0 < v <= 1
                and not attr.startswith("_")
                and _reads(source, f"self.{attr}")
            ):
                raise _refusal(
                    name,
                    f"applies dropout itself with its attribute {attr}={v:g} (functional dropout or an "
                    "attention function's dropout argument, not an nn.Dropout module)",
                    _fix(m, v, f"{name}.{attr}"),
                )
    return non_fused


def inject(
    model: nn.Module,
    adapter: str = "lora_mul_vpt_add",
    rank: int = 10,
    sigma: float = 0.0,
    targets: Targets = None,
    *,
    schedule: str = "pace",
    noise_free_blocks: Optional[int] = None,
    head: Heads = "auto",
    noise: str = "gaussian",
    noise_on: str = "delta",
    noise_shape: str = "sample",
    backend: str = "auto",
    config: Optional[PaceConfig] = None,
) -> nn.Module:
    """Replace the linear layers of ``model`` in place with :class:`PaceLinear` layers.

    The arguments are the fields of :class:`pace.PaceConfig` (pass one as ``config=`` instead);
    the model keeps the config as ``model.pace_config``, with the head and ``noise_free_blocks``
    that were resolved.

    Every ``nn.Linear`` (or those matching ``targets``, PEFT-style; a Hugging Face language model's
    output layer ``lm_head`` only when named) gets ``adapter``; the classifier
    becomes trainable :class:`PaceHead` layers; every other parameter is frozen. ``head="auto"``:
    timm's ``get_classifier()``; on a Hugging Face model its ``classifier`` / ``score`` /
    ``qa_outputs`` (every linear inside, e.g. RoBERTa's ``classifier.dense`` and
    ``classifier.out_proj``; a causal LM's ``lm_head`` stays frozen; an error if a task model has
    none of these, see :func:`pace.hf.find_hf_head`); else the last linear named ``head``. ``head``
    may also name a layer, a module (all linears inside) or a list of them; ``None``: no head.

    Each layer's sigma follows the depth schedule of docs/design.md section 4 with the first
    ``noise_free_blocks`` indices noise-free (default: 1 when the model has ViT-style ``blocks``,
    else 0, as for Swin and for Hugging Face stacks ``model.layers.N`` / ``encoder.layer.N``, whose
    index is ``N``). DropPath and dropout layers are replaced by versions that share masks across
    PACE copies, and timm attention with attention dropout takes its non-fused path so that its
    dropout is shared too; dropout that cannot be shared (inside Hugging Face attention functions,
    functional dropout, Dropout2d, PatchDropout, DropBlock) is refused with a ValueError naming the
    module and the fix, before the model is changed. For ``adapter="rlrr"`` every LayerNorm or
    RMSNorm-style norm (``LlamaRMSNorm``...) with a per-channel weight gets SSF's scale and shift.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    options = dict(
        adapter=adapter,
        rank=rank,
        sigma=sigma,
        targets=targets,
        schedule=schedule,
        noise_free_blocks=noise_free_blocks,
        head=head,
        noise=noise,
        noise_on=noise_on,
        noise_shape=noise_shape,
        backend=backend,
    )
    if config is None:
        config = PaceConfig(**options)
    elif not isinstance(config, PaceConfig):
        raise TypeError(f"config must be a pace.PaceConfig, got {type(config).__name__}")
    else:
        defaults = PaceConfig()
        given = sorted(k for k, v in options.items() if v != getattr(defaults, k))
        if given:
            raise TypeError(f"inject: pass either config= or the keyword arguments, not both (got {given})")
    if any(isinstance(m, PaceLinear) for m in model.modules()):
        raise ValueError("model already holds PaceLinear layers: inject once (pace.merge first to re-inject)")
    non_fused = _plan_dropout_sharing(model)

    head_names = _find_head(model, config.head)
    # "every linear layer" leaves a language model's output layer alone, as PEFT's "all-linear" does
    skipped = set(hf_output_layers(model)) if config.targets is None and is_hf_model(model) else set()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (n in head_names or (n not in skipped and _matches(n, config.targets)))
    ]
    if not names:
        raise ValueError(f"no nn.Linear layer of the model matches targets={config.targets!r}")
    noise_free = config.noise_free_blocks
    if noise_free is None:
        noise_free = 1 if hasattr(model, "blocks") and not hasattr(model, "layers") else 0
    index = block_indices(names, head_names)
    factors = schedule_factors(len(set(index.values())), noise_free, config.schedule)

    model.requires_grad_(False)
    adapter_class = layer_class(config.adapter)
    for name in names:
        kind_class = PaceHead if name in head_names else adapter_class
        layer = kind_class.from_linear(model.get_submodule(name), **config.layer_options())
        layer.block_index = index[name]
        layer.noise_scale = factors[index[name]]
        layer.sigma = config.sigma * layer.noise_scale
        _set_submodule(model, name, layer)
    if adapter_class.ssf_after_norms:
        for name, m in list(model.named_modules()):
            width = _affine_norm_width(m)
            if width is not None:
                _set_submodule(model, name, SSFNorm(m, width))
    _share_stochastic_layers(model, non_fused)
    model.pace_config = dataclasses.replace(
        config,
        noise_free_blocks=noise_free,
        head=head_names[0] if len(head_names) == 1 else (head_names or None),
    )
    return model


def _pace_layers(model: nn.Module) -> Iterator[PaceLinear]:
    return (m for m in model.modules() if isinstance(m, PaceLinear))


def set_sigma(model: nn.Module, sigma: float) -> None:
    """Re-apply the depth schedule set by :func:`inject` with a new base ``sigma``."""
    sigma = check_sigma(sigma)
    for m in _pace_layers(model):
        m.sigma = sigma * m.noise_scale
    if isinstance(getattr(model, "pace_config", None), PaceConfig):
        model.pace_config = dataclasses.replace(model.pace_config, sigma=sigma)


def set_backend(model: nn.Module, backend: str) -> None:
    """Pick the backend (``"auto"``, ``"triton"``, ``"torch"``) of every PaceLinear."""
    pace_kernels.check_backend(backend)
    for m in _pace_layers(model):
        m.backend = backend
    if isinstance(getattr(model, "pace_config", None), PaceConfig):
        model.pace_config = dataclasses.replace(model.pace_config, backend=backend)


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the pre-trained network: every adapter's ``dh`` (and SSF) off and no noise.
    The classifier head is kept as it is, since the pre-trained model has none for the new task."""
    switched = [
        m for m in model.modules() if isinstance(m, (PaceLinear, SSFNorm)) and not isinstance(m, PaceHead)
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
    """Fold every adapter into plain layers in place (docs/design.md section 6): PaceLinear -> nn.Linear,
    SSF into its LayerNorm's affine. The merged model's eval output equals the adapted model's."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PaceLinear):
            _set_submodule(model, name, m.to_linear())
        elif isinstance(m, SSFNorm):
            _set_submodule(model, name, m.merged())
    if hasattr(model, "pace_config"):
        del model.pace_config
    return model
