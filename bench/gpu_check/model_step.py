"""The model group of ``python -m bench.gpu_check check``: one PACE step of a timm ViT with and
without gradient checkpointing, fused against the reference."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .ops import randomise_adapter
from .results import CaseResult, TensorResult, allowed_error, max_rel_error, rel_l2_error

# A model step is a deep composition: its floor is the one-layer floor times this.
MODEL_FLOOR_FACTOR = 2.0
# Gradient checkpointing must not change fp32 gradients beyond this (issue 10, item 1).
CHECKPOINT_TOL = 1e-5


@dataclass(frozen=True)
class ModelCheckConfig:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    batch: int


def model_check_config(size: str) -> ModelCheckConfig:
    if size == "full":  # ViT-B width, 4 blocks, PACE's two copies of 8 images: 16 x 197 rows
        return ModelCheckConfig(224, 16, 768, 4, 12, 8)
    return ModelCheckConfig(32, 8, 48, 2, 3, 2)


def _vit(cfg: ModelCheckConfig, device: str) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    import pace

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=10,
        drop_path_rate=0.3,
    )
    pace.inject(model, adapter="lora_mul_vpt_add", rank=10, sigma=0.8, backend="torch")
    gen = torch.Generator().manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, pace.PaceLinear) and layer.adapter != "head":
            randomise_adapter(layer, gen)
    return model.to(device).train()


def _pace_step_grads(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    backend: str,
    checkpointing: bool,
    autocast: bool,
) -> list[torch.Tensor]:
    import pace

    pace.set_backend(model, backend)
    model.set_grad_checkpointing(checkpointing)
    params = pace.trainable_parameters(model)
    crit = pace.PaceCriterion(mode="pace", lam=1.0)
    torch.manual_seed(4321)  # the same DropPath masks and noise for every run
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = crit(model, x, y)
    grads = torch.autograd.grad(out.loss, params)
    model.set_grad_checkpointing(False)
    return [out.loss.detach().float().reshape(1), *(g.float() for g in grads)]


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _step_result(
    name: str,
    got: list[torch.Tensor],
    oracle: list[torch.Tensor],
    dtype: torch.dtype,
    reference: list[torch.Tensor] | None = None,
    limit: float | None = None,
) -> CaseResult:
    """Loss (max-relative) and all gradients (one flattened vector, rel. L2) of a step against
    ``oracle``: within ``limit``, or within the op criterion against ``reference``'s own error."""
    res = CaseResult("model", name)
    for label, pick in (("loss", lambda v: v[0]), ("grads (rel. L2)", lambda v: _flat(v[1:]))):
        measure = max_rel_error if label == "loss" else rel_l2_error
        err = measure(pick(got), pick(oracle))
        ref_err = 0.0 if reference is None else measure(pick(reference), pick(oracle))
        lim = limit if limit is not None else allowed_error(ref_err, dtype, MODEL_FLOOR_FACTOR)
        res.tensors.append(TensorResult(label, err, ref_err, lim, rel_l2_error(pick(got), pick(oracle))))
    return res


def run_model_checks(size: str, device: str) -> Iterator[CaseResult]:
    """One PACE step of a timm ViT (``lora_mul_vpt_add``, sigma 0.8, DropPath 0.3) with and without
    ``set_grad_checkpointing``, reference and fused: the loss and the gradients of every trainable
    tensor. Checkpointing must not change the gradients (issue 10 item 1, reference and fused);
    the fused step must match the reference (fp32, and bf16 autocast against fp32). Each result is
    yielded as soon as its steps have run, so a run stopped by its budget keeps the earlier ones."""
    cfg = model_check_config(size)
    model = _vit(cfg, device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, 10, (cfg.batch,), generator=gen).to(device)
    label = f"ViT d{cfg.embed_dim} depth {cfg.depth} b{cfg.batch} {cfg.img_size}px lora_mul_vpt_add pace"
    f32 = torch.float32
    clock = [time.perf_counter()]

    def grads(backend: str, ckpt: bool, amp: bool = False) -> list[torch.Tensor]:
        return _pace_step_grads(model, x, y, backend=backend, checkpointing=ckpt, autocast=amp)

    def timed(res: CaseResult) -> CaseResult:
        now = time.perf_counter()
        res.seconds, clock[0] = now - clock[0], now
        return res

    ref = grads("torch", False)
    ref_ckpt = grads("torch", True)
    yield timed(
        _step_result(
            f"{label} fp32: reference, checkpointing changes nothing (issue 10 item 1)",
            ref_ckpt,
            ref,
            f32,
            limit=CHECKPOINT_TOL,
        )
    )
    fused = grads("triton", False)
    yield timed(_step_result(f"{label} fp32: fused = reference", fused, ref, f32))
    fused_ckpt = grads("triton", True)
    yield timed(
        _step_result(
            f"{label} fp32: fused, checkpointing changes nothing (issue 10 item 1)",
            fused_ckpt,
            fused,
            f32,
            limit=CHECKPOINT_TOL,
        )
    )
    yield timed(
        _step_result(
            f"{label} fp32: fused with checkpointing = reference with checkpointing",
            fused_ckpt,
            ref_ckpt,
            f32,
        )
    )
    ref_amp = grads("torch", True, amp=True)
    fused_amp = grads("triton", True, amp=True)
    yield timed(
        _step_result(
            f"{label} bf16 autocast, checkpointing: fused vs fp32 reference",
            fused_amp,
            ref_ckpt,
            torch.bfloat16,
            reference=ref_amp,
        )
    )
