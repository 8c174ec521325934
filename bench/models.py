"""The models of the model benchmarks (:mod:`bench.test_model`) and their contenders.

* A timm ViT with ``lora_mul_vpt_add`` in every linear layer (:func:`build_vit`), the model PACE's
  paper benchmarks; as the ``peft`` contender the same ViT with PEFT's GLoRA layers
  (:func:`build_glora_vit`): ``config_A_B="lora"``, ``config_C="lora"``, ``config_D_E="vector"`` with
  GLoRA's additive ``B`` and ``E`` held at zero is exactly ``lora_mul_vpt_add``
  (``W0 + W0 * (B A)``, bias ``b0 + W0 (P_d P_u) + b0 * bias_scale``). PACE's noise is applied by
  forward hooks to GLoRA's adapter term, as the reference applies it, drawn in the same order from
  the same generator, so the two models compute the same training step.
* A Llama-style decoder from a ``transformers.LlamaConfig`` (random weights) with ``lora_add`` in
  its attention and MLP projections (:func:`build_llama`), trained on next-token prediction
  (:func:`lm_step_loss`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

SIGMA = 1.0
LAM = 1.0
VIT_ADAPTER, VIT_RANK = "lora_mul_vpt_add", 10
LLAMA_ADAPTER, LLAMA_RANK = "lora_add", 8
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelUnavailable(Exception):
    """Raised with the reason when a model or contender cannot be built here."""


# --- ViT ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VitConfig:
    name: str
    batch: int
    img_size: int
    num_classes: int
    precisions: tuple[str, ...]


def vit_config(device: str) -> VitConfig:
    if device == "cuda":
        return VitConfig("vit_base_patch16_224", 64, 224, 100, ("bf16-autocast", "fp32"))
    return VitConfig("vit-tiny-cpu", 8, 32, 10, ("fp32",))


def _timm_vit(cfg: VitConfig) -> nn.Module:
    """The pre-trained stand-in: random weights, the same for every call (seeded)."""
    import timm

    torch.manual_seed(0)
    if cfg.name == "vit-tiny-cpu":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=cfg.img_size,
            patch_size=8,
            embed_dim=96,
            depth=2,
            num_heads=3,
            num_classes=cfg.num_classes,
            drop_path_rate=0.1,
        )
    return timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, drop_path_rate=0.1)


def build_vit(cfg: VitConfig, device: str) -> nn.Module:
    """The timm ViT with ``lora_mul_vpt_add`` r10 everywhere and PACE's schedule (sigma 1). The adapter
    tensors are drawn nonzero (PACE's init has B = 0 and P_d = 0), so a contender that dropped a
    path would fail the forward check."""
    import pace

    model = _timm_vit(cfg)
    pace.inject(model, adapter=VIT_ADAPTER, rank=VIT_RANK, sigma=SIGMA, backend="torch")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, pace.PaceLinear) and layer.adapter != "head":
                for p in layer.adapter_parameters().values():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / max(1.0, min(p.shape) ** 0.5))
    return model.to(device).train()


class GloraNoise:
    """PACE's noise on a PEFT GLoRA layer's adapter term: ``y = h + z * (glora(x) - h)``, ``h`` the frozen
    layer's output (kept by a hook on GLoRA's ``base_layer``), ``z ~ N(1, sigma^2)`` per sample and
    output channel, drawn as :class:`pace.PaceLinear` draws it."""

    def __init__(self, layer: nn.Module, noise_scale: float) -> None:
        self.noise_scale = noise_scale
        self.sigma = 0.0
        self._frozen_output: torch.Tensor | None = None
        layer.base_layer.register_forward_hook(self._keep_frozen_output)
        layer.register_forward_hook(self._apply_noise)

    def _keep_frozen_output(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        self._frozen_output = out

    def _apply_noise(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        from pace import draw_noise
        from pace_kernels import expand_noise

        h, self._frozen_output = self._frozen_output, None
        x = inputs[0]
        if not (module.training and self.sigma > 0) or x.ndim < 2:
            return out
        z = draw_noise("gaussian", self.sigma, (x.shape[0], out.shape[-1]), device=x.device)
        return h + (out - h) * expand_noise(z, x, out.dtype)


def build_glora_vit(cfg: VitConfig, device: str, reference: nn.Module) -> nn.Module:
    """The ViT of :func:`build_vit` with PEFT's GLoRA layers holding ``reference``'s adapter values,
    its head as ``reference``'s (a noisy trainable :class:`pace.PaceLinear`), its DropPath shared
    across PACE's copies; ``model.glora_noise`` holds the noise hooks (see :func:`set_glora_sigma`)."""
    try:
        import peft
    except ImportError as exc:
        raise ModelUnavailable(f"peft is not installed ({exc})") from exc
    if not hasattr(peft, "GloraConfig"):
        raise ModelUnavailable(f"peft {peft.__version__} has no GLoRA (no peft.GloraConfig; 0.21.2 has it)")
    import pace

    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, pace.PaceLinear)}
    head_name = reference.pace_config["head"]
    adapted = [n for n, m in ref_layers.items() if m.adapter != "head"]
    model = _timm_vit(cfg)
    # inject with the head alone: the head layer and the shared DropPath, everything else frozen
    pace.inject(model, adapter=VIT_ADAPTER, rank=VIT_RANK, sigma=SIGMA, targets=[head_name], backend="torch")
    config = peft.GloraConfig(
        r=VIT_RANK,
        target_modules="(" + "|".join(map(re.escape, adapted)) + ")",
        config_A_B="lora",
        config_C="lora",
        config_D_E="vector",
    )
    peft.inject_adapter_in_model(config, model)
    model.requires_grad_(False)
    model.glora_noise = []
    with torch.no_grad():
        for name in adapted:
            src, layer = ref_layers[name], model.get_submodule(name)
            pairs = [
                (layer.glora_A["default"].Xd, src.lora_b),
                (layer.glora_A["default"].Xu, src.lora_a),
                (layer.glora_C["default"].Xd, src.prompt_down),
                (layer.glora_C["default"].Xu, src.prompt_up),
                (layer.glora_D["default"].X, src.bias_scale),
            ]
            for dst, value in pairs:
                dst.copy_(value)
                dst.requires_grad_(True)
            additive = (layer.glora_B["default"].Xd, layer.glora_B["default"].Xu, layer.glora_E["default"].X)
            for zero in additive:
                zero.zero_()  # GLoRA's additive terms: not part of lora_mul_vpt_add, held at zero
            model.glora_noise.append(GloraNoise(layer, src.noise_scale))
        head, src_head = model.get_submodule(head_name), ref_layers[head_name]
        head.weight.copy_(src_head.weight)
        head.bias.copy_(src_head.bias)
        head.weight.requires_grad_(True)
        head.bias.requires_grad_(True)
        head.noise_scale = src_head.noise_scale
    return model.to(device).train()


def set_glora_sigma(model: nn.Module, sigma: float) -> None:
    """:func:`pace.set_sigma` for the GLoRA ViT: its head and its noise hooks."""
    import pace

    pace.set_sigma(model, sigma)
    for hook in model.glora_noise:
        hook.sigma = sigma * hook.noise_scale


# --- Llama -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaBenchConfig:
    name: str
    batch: int
    seq_len: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    precision: str  # "bf16" (weights and adapters in bf16) or "fp32"


def llama_config(device: str) -> LlamaBenchConfig:
    if device == "cuda":  # two Llama-2-7B layers at a 2048-token context: 8192 rows per PACE step
        return LlamaBenchConfig("llama-4096x2", 2, 2048, 4096, 11008, 2, 32, 32000, "bf16")
    return LlamaBenchConfig("llama-tiny-cpu", 2, 32, 64, 128, 2, 4, 256, "fp32")


def build_llama(cfg: LlamaBenchConfig, device: str) -> nn.Module:
    """``LlamaForCausalLM`` from a config (random weights) with ``lora_add`` r8 in every projection of
    its blocks, PACE's schedule (sigma 1), the embeddings and ``lm_head`` frozen."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelUnavailable(f"transformers is not installed ({exc})") from exc
    import pace

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    pace.inject(
        model,
        adapter=LLAMA_ADAPTER,
        rank=LLAMA_RANK,
        sigma=SIGMA,
        targets=list(LLAMA_TARGETS),
        head=None,
        backend="torch",
    )
    return model.train()


def lm_step_loss(
    model: nn.Module, input_ids: torch.Tensor, pace_copies: bool, lam: float = LAM
) -> torch.Tensor:
    """Next-token cross-entropy; with ``pace_copies`` PACE's loss on the two copies ``[ids; ids]``:
    CE on copy 1 plus ``lam`` times the mean over the scored positions of ``sum_c (f1 - f2)^2``
    (docs/design.md section 5, token-level outputs; every position but the last is scored)."""
    import pace

    crit = pace.PaceCriterion("pace" if pace_copies else "none", lam, shift_labels=True)
    return crit(model, {"input_ids": input_ids}, input_ids).loss
