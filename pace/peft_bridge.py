"""PACE adapters in and out of Hugging Face PEFT, exactly (docs/design.md section 2 tensors <-> PEFT keys).

Each pace kind is written as the PEFT type that holds it without approximation:

=====================  =====================================================================
pace kind              PEFT form (keys after ``base_model.model.<layer path>.``)
=====================  =====================================================================
``lora_add``           LoRA, ``lora_alpha = r``, ``lora_bias`` when a layer has a bias:
                       ``lora_a`` -> ``lora_A.weight``, ``lora_b`` -> ``lora_B.weight``,
                       ``delta_bias`` -> ``lora_B.bias``
``lora_mul``           HiRA when every ``bias_scale`` is zero: ``lora_a`` -> ``hira_A``,
                       ``lora_b`` -> ``hira_B``; else GLoRA (A_B ``lora``, C ``none``, D_E
                       ``vector``): ``lora_a`` -> ``glora_A.Xu``, ``lora_b`` -> ``glora_A.Xd``,
                       ``bias_scale`` -> ``glora_D.X``; ``glora_B.*`` and ``glora_E.X`` zero
``lora_mul_vpt_add``   GLoRA (A_B ``lora``, C ``lora``, D_E ``vector``): as ``lora_mul`` plus
                       ``prompt_down`` -> ``glora_C.Xd``, ``prompt_up`` -> ``glora_C.Xu``
``vpt_add``            GLoRA (A_B ``none``, C ``lora``, D_E ``none``): the prompts as above
classifier head        ``modules_to_save``: ``<head>.weight``, ``<head>.bias``
=====================  =====================================================================

Targets are written as a regex that matches the adapted layers only. PEFT's ``lora_bias`` puts a
bias on every targeted layer: bias-free layers of a model that also has layers with a bias get a
zero one (PEFT may then train it; pace has none there).

PEFT adapters come back the other way; a LoRA ``lora_alpha / r`` (or rsLoRA ``lora_alpha /
sqrt(r)``) scale is folded into ``lora_b`` and ``delta_bias``, which gives the same outputs (the
optimiser then sees B at that scale, as after a change of ``lora_alpha``). Tensors a pace kind has and
the PEFT adapter lacks (``delta_bias`` from a LoRA without ``lora_bias``, ``bias_scale`` from HiRA)
start at zero, so outputs are equal, and train with PACE like any adapter of that kind. Whatever has
no exact form (RLRR's SSF, GLoRA's additive weight path, dropout, DoRA, several adapters, non-Linear
targets, ...) is refused with a message that names it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .config import PaceConfig
from .inject import inject
from .io import atomic_write
from .layers import PaceHead, PaceLinear, SSFNorm

__all__ = ["save_peft", "load_peft", "from_peft"]

PathLike = Union[str, os.PathLike]
_PREFIX = "base_model.model."
_WEIGHTS_NAME = "adapter_model.safetensors"
_CONFIG_NAME = "adapter_config.json"

# GLoRA's per-layer tensors by (path, mode): key suffix -> shape code (D out, K in, r rank). A path
# set to "none", and C/D/E on a layer without bias, hold a zeros buffer that PEFT saves too.
_GLORA_KEYS = {
    "lora": {"A": {"Xd": "Dr", "Xu": "rK"}, "B": {"Xd": "Dr", "Xu": "rK"}, "C": {"Xd": "Kr", "Xu": "r1"}},
    "vector": {"D": {"X": "D"}, "E": {"X": "D"}},
    "none": {"A": {"zeros": "DK"}, "B": {"zeros": "DK"}, "C": {"zeros": "K1"}, "D": {"zeros": "D"}},
}
_GLORA_KEYS["none"]["E"] = {"zeros": "D"}

# The GLoRA (config_A_B, config_C, config_D_E) of each pace kind, and which GLoRA tensor holds which
# pace tensor; every other GLoRA tensor is zero.
_GLORA_FORMS = {
    "lora_mul": (("lora", "none", "vector"), {"A.Xu": "lora_a", "A.Xd": "lora_b", "D.X": "bias_scale"}),
    "lora_mul_vpt_add": (
        ("lora", "lora", "vector"),
        {
            "A.Xu": "lora_a",
            "A.Xd": "lora_b",
            "C.Xd": "prompt_down",
            "C.Xu": "prompt_up",
            "D.X": "bias_scale",
        },
    ),
    "vpt_add": (("none", "lora", "none"), {"C.Xd": "prompt_down", "C.Xu": "prompt_up"}),
}
# LoRA's and HiRA's per-layer tensors: key suffix -> (pace tensor name, shape code).
_LORA_KEYS = {"lora_A.weight": ("lora_a", "rK"), "lora_B.weight": ("lora_b", "Dr")}
_LORA_BIAS_KEY = {"lora_B.bias": ("delta_bias", "D")}
_HIRA_KEYS = {"hira_A": ("lora_a", "rK"), "hira_B": ("lora_b", "Dr")}
_NO_PEFT_FORM = {
    "rlrr": "RLRR's SSF scale/shift after every LayerNorm has no PEFT form",
    "head": "a head alone is no adapter",
}
# LoRA settings that change what a layer computes (or what it is) and have no exact pace form.
_LORA_REFUSED = {
    "use_dora": "DoRA (use_dora=True) rescales the weight by a learned magnitude",
    "use_qalora": "QALoRA (use_qalora=True) pools the input of quantized layers",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) splits the adapter into blocks",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) switches on per token",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "target_parameters": "target_parameters adapts raw parameters, not nn.Linear layers",
    "layer_replication": "layer_replication duplicates layers",
    "megatron_config": "Megatron parallel layers (megatron_config) are not nn.Linear",
}


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "the PEFT bridge (pace.save_peft / load_peft / from_peft) needs Hugging Face PEFT: "
            "pip install 'pace[peft]'"
        ) from exc
    return peft


def _shape(code: str, d: int, k: int, r: int) -> Tuple[int, ...]:
    sizes = {"D": d, "K": k, "r": r, "1": 1}
    return tuple(sizes[c] for c in code)


def _glora_layer_keys(kind: str, modes: Sequence[str], d: int, k: int, r: int, *, has_bias: bool) -> dict:
    """GLoRA key suffix -> (pace tensor name or None for a tensor that must be zero, shape)."""
    held = _GLORA_FORMS[kind][1] if kind in _GLORA_FORMS else {}
    a_b, c, d_e = modes
    out = {}
    for path, mode in zip("ABCDE", (a_b, a_b, c, d_e, d_e)):
        if path in "CDE" and not has_bias:
            mode = "none"
        for key, code in _GLORA_KEYS[mode][path].items():
            out[f"glora_{path}.{key}"] = (held.get(f"{path}.{key}"), _shape(code, d, k, r))
    return out


def _layer_keys(
    peft_type: str, kind: str, modes, layer_dims: Tuple[int, int, int], *, has_bias: bool, lora_bias: bool
) -> dict:
    """PEFT key suffix -> (pace tensor name, or None for a tensor that must be zero; shape) of one layer."""
    d, k, r = layer_dims
    if peft_type == "GLORA":
        return _glora_layer_keys(kind, modes, d, k, r, has_bias=has_bias)
    table = dict(_HIRA_KEYS if peft_type == "HIRA" else _LORA_KEYS)
    if peft_type == "LORA" and lora_bias:
        table.update(_LORA_BIAS_KEY)
    # PEFT puts lora_B.bias on every targeted layer; pace has delta_bias only where the layer has b0.
    return {
        key: (None if name == "delta_bias" and not has_bias else name, _shape(code, d, k, r))
        for key, (name, code) in table.items()
    }


def _targets_regex(module_names: Sequence[str], adapted: Sequence[str]) -> str:
    """A regex (PEFT: ``re.fullmatch`` on module names) matching the adapted layers only: their
    paths with block numbers generalised to ``\\d+`` when that still matches nothing else (a timm
    patch-embedding conv called ``proj`` stays out), else the exact names."""
    adapted_set = set(adapted)

    def pattern(parts_of):
        alternatives = list(dict.fromkeys(parts_of(n) for n in adapted))
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    general = pattern(lambda n: r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in n.split(".")))
    if {n for n in module_names if re.fullmatch(general, n)} == adapted_set:
        return general
    return pattern(re.escape)


# ------------------------------------------------------------------------------------------ export
def _lora_mul_target(layers: Dict[str, PaceLinear]) -> str:
    used = any(m.bias_scale is not None and bool(m.bias_scale.detach().ne(0).any()) for m in layers.values())
    return "GLORA" if used else "HIRA"


def save_peft(model: nn.Module, directory: PathLike) -> Path:
    """Write an injected ``model``'s adapter in PEFT's own format (``adapter_config.json`` +
    ``adapter_model.safetensors``), as the PEFT type that represents it exactly (see the module
    docstring), so that ``peft.PeftModel.from_pretrained(base_model, directory)`` gives the same
    eval outputs. Returns the directory."""
    peft = _import_peft()
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_peft: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(getattr(model, "pace_config", None), PaceConfig):
        raise ValueError("save_peft: model has no PACE adapters (call pace.inject or pace.load_peft first)")
    if any(isinstance(m, SSFNorm) for m in model.modules()):
        raise ValueError(f"save_peft: adapter 'rlrr' cannot be written to PEFT: {_NO_PEFT_FORM['rlrr']}")
    pace_layers = {n: m for n, m in model.named_modules() if isinstance(m, PaceLinear)}
    layers = {n: m for n, m in pace_layers.items() if not isinstance(m, PaceHead)}
    heads = [n for n, m in pace_layers.items() if isinstance(m, PaceHead)]
    kinds = sorted({m.adapter for m in layers.values()})
    if len(kinds) != 1:
        raise ValueError(f"save_peft: PEFT holds one adapter kind per model, the model has {kinds or 'none'}")
    kind = kinds[0]
    if kind in _NO_PEFT_FORM:
        raise ValueError(f"save_peft: adapter {kind!r} cannot be written to PEFT: {_NO_PEFT_FORM[kind]}")
    ranks = sorted({m.rank for m in layers.values()})
    if len(ranks) != 1:
        raise ValueError(f"save_peft: the adapted layers have different ranks {ranks}; PEFT's r is one rank")
    rank = ranks[0]
    if kind in ("vpt_add", "lora_mul_vpt_add"):
        bias_free = [n for n, m in layers.items() if m.bias is None]
        if bias_free:
            raise ValueError(
                f"save_peft: adapter {kind!r} on layers without bias ({bias_free[:3]}) has no exact "
                "PEFT form: GLoRA's prompt path (b += W0 C) exists only on layers with a bias"
            )

    peft_type = "LORA" if kind == "lora_add" else _lora_mul_target(layers) if kind == "lora_mul" else "GLORA"
    modes = _GLORA_FORMS[kind][0] if peft_type == "GLORA" else None
    lora_bias = any(m.bias is not None for m in layers.values())
    tensors: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        dims = (layer.out_features, layer.in_features, rank)
        for suffix, (pace_name, shape) in _layer_keys(
            peft_type, kind, modes, dims, has_bias=layer.bias is not None, lora_bias=lora_bias
        ).items():
            value = getattr(layer, pace_name) if pace_name is not None else None
            if value is None:
                value = torch.zeros(shape, dtype=layer.weight.dtype)
            tensors[f"{_PREFIX}{name}.{suffix}"] = value.detach().reshape(shape).to("cpu").contiguous()

    module_names = [n for n, _ in model.named_modules()]
    head = heads[0] if heads else None
    if head is not None:
        clashes = [n for n in module_names if n.endswith(head) and n != head]
        if clashes:
            raise ValueError(
                f"save_peft: PEFT's modules_to_save matches names by suffix, and {head!r} would also "
                f"catch {clashes[:3]}"
            )
        for pname, p in pace_layers[head].named_parameters(recurse=False):
            tensors[f"{_PREFIX}{head}.{pname}"] = p.detach().to("cpu").contiguous()

    common = dict(
        r=rank,
        target_modules=_targets_regex(module_names, list(layers)),
        modules_to_save=[head] if head is not None else None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
    )
    if peft_type == "LORA":
        config = peft.LoraConfig(lora_alpha=rank, lora_bias=lora_bias, lora_dropout=0.0, **common)
    elif peft_type == "HIRA":
        config = peft.HiraConfig(**common)
    else:
        a_b, c, d_e = modes
        config = peft.GloraConfig(config_A_B=a_b, config_C=c, config_D_E=d_e, **common)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / _WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config.save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------------------------------ import
def _check_config(peft, config) -> Tuple[str, Optional[Tuple[str, str, str]]]:
    """The PEFT type and GLoRA modes of ``config``, or a ValueError naming what pace cannot hold."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in ("LORA", "HIRA", "GLORA"):
        raise ValueError(f"PEFT type {peft_type} has no exact pace form (supported: LORA, HIRA, GLORA)")
    if getattr(config, "bias", "none") != "none":
        raise ValueError(f"PEFT bias={config.bias!r} trains the frozen biases; pace needs bias='none'")
    if getattr(config, "fan_in_fan_out", False):
        raise ValueError("PEFT fan_in_fan_out=True (Conv1D layers) has no pace form: pace adapts nn.Linear")
    for field in ("lora_dropout", "hira_dropout"):
        if getattr(config, field, 0.0):
            raise ValueError(
                f"PEFT {field}={getattr(config, field)} has no exact pace form (PACE perturbs the adapter "
                f"with its own noise): set {field}=0"
            )
    if peft_type == "LORA":
        for field, why in _LORA_REFUSED.items():
            if getattr(config, field, None):
                raise ValueError(f"PEFT LoRA setting {field} has no exact pace form: {why}")
        return peft_type, None
    if peft_type == "GLORA":
        modes = (config.config_A_B, config.config_C, config.config_D_E)
        accepted = {form[0] for form in _GLORA_FORMS.values()} | {
            ("lora", "none", "none"),
            ("lora", "lora", "none"),
        }
        if modes not in accepted:
            raise ValueError(
                f"PEFT GLoRA (config_A_B, config_C, config_D_E)={modes} has no exact pace form; pace holds "
                f"{sorted(accepted)}"
            )
        return peft_type, modes
    return peft_type, None


def _glora_kind(modes: Tuple[str, str, str], has_bias: Sequence[bool]) -> str:
    a_b, c, _ = modes
    if a_b == "none":
        if not all(has_bias):
            raise ValueError("PEFT GLoRA with config_A_B='none' on layers without bias: no adapter to take")
        return "vpt_add"
    if c == "none" or not any(has_bias):  # GLoRA has no C, D, E on bias-free layers
        return "lora_mul"
    if not all(has_bias):
        raise ValueError(
            "PEFT GLoRA with config_C='lora' on a mix of layers with and without bias has no exact pace "
            "form: pace's lora_mul_vpt_add holds a prompt on every layer, GLoRA only where a bias is"
        )
    return "lora_mul_vpt_add"


def _tuner_layer_classes() -> tuple:
    from peft.tuners.glora.layer import GloraLinear
    from peft.tuners.hira.layer import Linear as HiraLinear
    from peft.tuners.lora.layer import Linear as LoraLinear

    return LoraLinear, HiraLinear, GloraLinear


def _layer_values(state: dict, prefix: str, keys: dict, scale: float, kind: str) -> Dict[str, torch.Tensor]:
    """The pace tensors of one layer from PEFT's state dict; the PEFT terms pace has no tensor for
    (GLoRA's additive weight ``B = Xd Xu`` and bias ``E``, a LoRA bias where the layer has none)
    must be zero."""
    for suffix in keys:
        if prefix + suffix not in state:
            raise ValueError(
                f"from_peft: the PEFT adapter has no tensor {prefix + suffix} (a different layout?)"
            )
    values, unused = {}, {}
    for suffix, (pace_name, shape) in keys.items():
        t = state[prefix + suffix].detach().reshape(shape)
        if pace_name is None:
            unused.setdefault(suffix.rpartition(".")[0] or suffix, {})[suffix.rpartition(".")[2]] = t
        elif pace_name in ("lora_b", "delta_bias") and scale != 1.0:
            values[pace_name] = t * scale  # LoRA's lora_alpha / r (or / sqrt(r)) folded in: the same outputs
        else:
            values[pace_name] = t
    for term, parts in unused.items():
        value = (
            parts["Xd"] @ parts["Xu"]
            if set(parts) == {"Xd", "Xu"}
            else torch.cat([t.flatten() for t in parts.values()])
        )
        if bool(value.ne(0).any()):
            raise ValueError(
                f"from_peft: {prefix}{term} is nonzero, and pace's {kind} has no such term (GLoRA's additive "
                "weight B or bias E, or a LoRA bias on a layer without bias)"
            )
    return values


def from_peft(
    peft_model: nn.Module,
    *,
    sigma: float = 0.0,
    schedule: str = "pace",
    noise_free_blocks: Optional[int] = None,
    noise: str = "gaussian",
    noise_on: str = "delta",
    noise_shape: str = "sample",
    backend: str = "auto",
) -> nn.Module:
    """The model under a ``peft.PeftModel`` (LoRA, HiRA or GLoRA) with its adapter layers replaced by
    :class:`PaceLinear` layers holding the same tensors: the same outputs, the PACE depth schedule
    for ``sigma`` (the other arguments as in :func:`pace.inject`), ready for ``PaceCriterion`` and the
    fused kernels. Frozen parameters stay frozen; a ``modules_to_save`` classifier becomes the
    trainable PACE head. The PeftModel is consumed (PEFT's ``unload``)."""
    peft = _import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"from_peft: peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    # checked before the PeftModel is consumed; the adapter kind, rank, targets and head follow
    pace_config = PaceConfig(
        sigma=sigma,
        schedule=schedule,
        noise_free_blocks=noise_free_blocks,
        noise=noise,
        noise_on=noise_on,
        noise_shape=noise_shape,
        backend=backend,
    )
    names = list(peft_model.peft_config)
    if len(names) != 1:
        raise ValueError(f"from_peft: the PeftModel holds several adapters {names}; pace takes one")
    adapter = names[0]
    config = peft_model.peft_config[adapter]
    peft_type, modes = _check_config(peft, config)

    base = peft_model.get_base_model()
    allowed = _tuner_layer_classes()
    layers: Dict[str, nn.Module] = {}
    for name, m in base.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        if type(m) not in allowed or type(m.get_base_layer()) is not nn.Linear:
            raise ValueError(
                f"from_peft: layer {name!r} is a {type(m).__name__} over a "
                f"{type(m.get_base_layer()).__name__}; pace adapts plain nn.Linear layers only"
            )
        if m.merged:
            raise ValueError(
                f"from_peft: layer {name!r} has its adapter merged: call unmerge_adapter() first"
            )
        if getattr(m, "lora_variant", {}).get(adapter) is not None:
            raise ValueError(f"from_peft: layer {name!r} uses a LoRA variant (DoRA, aLoRA, ...)")
        layers[name] = m
    if not layers:
        raise ValueError("from_peft: the PeftModel has no adapted layers")
    heads = []
    for name, m in base.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            trained = m.modules_to_save[adapter] if adapter in m.modules_to_save else None
            if not isinstance(trained, nn.Linear):
                raise ValueError(
                    f"from_peft: modules_to_save holds {name!r} ({type(trained).__name__}); pace trains one "
                    "classifier head, an nn.Linear"
                )
            heads.append(name)
        elif isinstance(m, AuxiliaryTrainingWrapper):
            raise ValueError(f"from_peft: {name!r} is a {type(m).__name__}, which pace has no form for")
    if len(heads) > 1:
        raise ValueError(f"from_peft: modules_to_save holds several modules {heads}; pace trains one head")

    ranks = sorted({int(m.r[adapter]) for m in layers.values()})
    if len(ranks) != 1:
        raise ValueError(
            f"from_peft: the adapted layers have different ranks {ranks} (rank_pattern); pace has one"
        )
    rank = ranks[0]
    has_bias = [m.get_base_layer().bias is not None for m in layers.values()]
    kind = {"LORA": "lora_add", "HIRA": "lora_mul"}.get(peft_type) or _glora_kind(modes, has_bias)
    if peft_type == "GLORA" and kind == "lora_mul":
        modes = (modes[0], "none", modes[2])  # C is absent (or must be unused) when the kind has no prompt

    state = get_peft_model_state_dict(peft_model, state_dict=peft_model.state_dict(), adapter_name=adapter)
    values: Dict[str, Dict[str, torch.Tensor]] = {}
    used = set()
    for name, m in layers.items():
        w = m.get_base_layer().weight
        dims = (w.shape[0], w.shape[1], rank)
        scale = float(m.scaling[adapter]) if peft_type == "LORA" else 1.0
        lora_bias = bool(getattr(m, "lora_bias", {}).get(adapter, False))
        keys = _layer_keys(
            peft_type, kind, modes, dims, has_bias=m.get_base_layer().bias is not None, lora_bias=lora_bias
        )
        values[name] = _layer_values(state, f"{_PREFIX}{name}.", keys, scale, kind)
        used.update(f"{_PREFIX}{name}.{suffix}" for suffix in keys)
    for head in heads:
        used.update(k for k in state if k.startswith(f"{_PREFIX}{head}."))
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"from_peft: the PEFT adapter has tensors pace has no form for: {unknown[:5]}")

    model = peft_model.unload()
    module_names = [n for n, _ in model.named_modules()]
    pace_config = dataclasses.replace(
        pace_config,
        adapter=kind,
        rank=rank,
        targets=_targets_regex(module_names, list(values)),
        head=heads[0] if heads else None,
    )
    return _put_pace_layers(model, values, pace_config)


def _put_pace_layers(
    model: nn.Module, values: Dict[str, Dict[str, torch.Tensor]], pace_config: PaceConfig
) -> nn.Module:
    inject(model, config=pace_config)
    with torch.no_grad():
        for name, tensors in values.items():
            layer = model.get_submodule(name)
            for p in layer.adapter_parameters().values():  # what the PEFT adapter lacks starts at zero
                p.zero_()
            for pace_name, t in tensors.items():
                getattr(layer, pace_name).copy_(t)
    return model


def load_peft(
    model: nn.Module,
    directory: PathLike,
    *,
    sigma: float = 0.0,
    schedule: str = "pace",
    noise_free_blocks: Optional[int] = None,
    noise: str = "gaussian",
    noise_on: str = "delta",
    noise_shape: str = "sample",
    backend: str = "auto",
) -> nn.Module:
    """Put :class:`PaceLinear` layers into a plain pre-trained ``model`` from a PEFT LoRA / HiRA /
    GLoRA directory (``save_pretrained``'s ``adapter_config.json`` + ``adapter_model.safetensors``):
    the same outputs as ``peft.PeftModel.from_pretrained(model, directory)``, ready to train with
    PACE (arguments as in :func:`from_peft`). Returns ``model``, changed in place."""
    peft = _import_peft()
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_peft: model must be an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    for name in (_CONFIG_NAME, _WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"load_peft: {directory / name} does not exist (a PEFT save_pretrained directory?)"
            )
    if any(isinstance(m, PaceLinear) for m in model.modules()):
        raise ValueError("load_peft: model already holds PaceLinear layers: pass the plain pre-trained model")
    config = peft.PeftConfig.from_pretrained(str(directory))
    _check_config(peft, config)  # refuse before touching the model
    peft_model = peft.PeftModel.from_pretrained(
        model, str(directory), is_trainable=True, autocast_adapter_dtype=False
    )
    try:
        return from_peft(
            peft_model,
            sigma=sigma,
            schedule=schedule,
            noise_free_blocks=noise_free_blocks,
            noise=noise,
            noise_on=noise_on,
            noise_shape=noise_shape,
            backend=backend,
        )
    except (ValueError, TypeError):
        peft_model.unload()  # give the caller back the model it passed in
        raise
