"""Model benchmarks: one ViT training step (forward, backward, AdamW) per PACE objective.

On CUDA: timm ViT-B/16 (random weights, drop_path 0.1 as the public PACE code), batch 64, 224 px,
``lora_mul_vpt_add`` rank 10 in every linear layer, at bf16 autocast and at fp32 (the public code's
precision). On CPU a tiny ViT (32 px, depth 2, batch 8, fp32) exercises the same code in seconds;
its numbers say nothing about GPU speed.

Modes (SPEC section 5): ``baseline`` (sigma 0, cross-entropy only), ``pace`` (two copies, 2B rows),
``fast`` (one copy, history bank), ``lazy`` (lazy_half, N = 2). Contenders: ``reference``
(``backend="torch"``), ``fused`` (``backend="triton"``, CUDA only) and ``compiled``
(``torch.compile`` of the reference model). Compiling a ViT-B training graph costs close to a minute
per variant, so by default only the bf16 ``pace`` step is compiled on CUDA
(``PACE_BENCH_MODEL_COMPILE=all|pace|none`` changes that; on CPU it runs only with ``all``).

One benchmark call runs two optimizer steps, so lazy_half's two kinds of step are both in every
round; ``images_per_call`` counts the batch's images (PACE's copies count once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from bench import specs
from bench.contenders import fused_unavailable_reason

SIGMA = 1.0
LAM = 1.0
NUM_SAMPLES = 1000  # dataset size for PACE_fast's history bank (VTAB-1k size)
STEPS_PER_CALL = 2
MODES = ("baseline", "pace", "fast", "lazy")
CONTENDERS = ("reference", "compiled", "fused")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    batch: int
    img_size: int
    num_classes: int
    precisions: tuple[str, ...]


def model_config() -> ModelConfig:
    if specs.device() == "cuda":
        return ModelConfig("vit_base_patch16_224", 64, 224, 100, ("bf16-autocast", "fp32"))
    return ModelConfig("vit-tiny-cpu", 8, 32, 10, ("fp32",))


def _compile_policy() -> str:
    default = "pace" if specs.device() == "cuda" else "none"
    value = os.environ.get("PACE_BENCH_MODEL_COMPILE", default)
    if value not in ("all", "pace", "none"):
        raise ValueError(f"PACE_BENCH_MODEL_COMPILE must be all, pace or none, got {value!r}")
    return value


def _build_model(cfg: ModelConfig, device: str) -> torch.nn.Module:
    import timm

    if cfg.name == "vit-tiny-cpu":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=cfg.img_size, patch_size=8, embed_dim=96, depth=2, num_heads=3,
                                  num_classes=cfg.num_classes, drop_path_rate=0.1)
    else:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, drop_path_rate=0.1)
    return model


_MODELS: dict[str, torch.nn.Module] = {}


def _pace_model(cfg: ModelConfig, device: str):
    """One injected model per session (building ViT-B takes seconds); benchmarks set sigma and backend."""
    import pace

    if cfg.name not in _MODELS:
        model = _build_model(cfg, device)
        pace.inject(model, adapter="lora_mul_vpt_add", rank=10, sigma=SIGMA, backend="torch")
        _MODELS[cfg.name] = model.to(device).train()
    return _MODELS[cfg.name]


def _criterion(mode: str, cfg: ModelConfig, device: str):
    import pace

    if mode == "baseline":
        return pace.PaceCriterion(mode="none")
    if mode == "pace":
        return pace.PaceCriterion(mode="pace", lam=LAM)
    if mode == "fast":
        return pace.PaceCriterion(mode="fast", lam=LAM, num_samples=NUM_SAMPLES,
                                  num_classes=cfg.num_classes).to(device)
    if mode == "lazy":
        return pace.PaceCriterion(mode="lazy", lam=LAM, lazy_interval=2)
    raise ValueError(mode)


def _skip_reason(cfg: ModelConfig, precision: str, mode: str, contender: str, device: str) -> str | None:
    try:
        import timm  # noqa: F401

        import pace  # noqa: F401
    except ImportError as exc:
        return f"model benchmarks need pace and timm ({exc})"
    if contender == "fused":
        return fused_unavailable_reason(specs.Op("lora_mul", 10, "sample"), device)
    if contender == "compiled":
        policy = _compile_policy()
        if policy == "none":
            why = "; on CPU compiling even the tiny model costs more than the reduced budget"
            why = why if device == "cpu" else ""
            return f"compiled model: off (PACE_BENCH_MODEL_COMPILE=none{why})"
        if policy == "pace" and not (mode == "pace" and precision == cfg.precisions[0]):
            return ("compiled model: only the bf16 pace step is compiled by default (a ViT-B training graph "
                    "takes about a minute to compile); PACE_BENCH_MODEL_COMPILE=all compiles every mode")
    return None


def _cases() -> list:
    cfg = model_config()
    return [
        pytest.param(precision, mode, contender, id=f"{cfg.name}-{precision}-{mode}-{contender}")
        for precision in cfg.precisions
        for mode in MODES
        for contender in CONTENDERS
    ]


def _make_steps(model, crit, cfg: ModelConfig, precision: str, device: str) -> Callable[[], float]:
    import pace

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen).to(device)
    opt = torch.optim.AdamW(pace.trainable_parameters(model), lr=1e-3, weight_decay=1e-4)
    amp = precision == "bf16-autocast"
    state = {"step": 0, "loss": 0.0}

    def one_step() -> None:
        step = state["step"]
        state["step"] += 1
        index = (torch.arange(cfg.batch, device=device) + step * cfg.batch) % NUM_SAMPLES
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            out = crit(model, x, y, index=index, step=step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        state["loss"] = out.loss

    def call() -> None:
        for _ in range(STEPS_PER_CALL):
            one_step()

    call.state = state  # type: ignore[attr-defined]
    return call


@pytest.mark.parametrize("precision,mode,contender", _cases())
def test_model_step(benchmark, timing, bench_device, precision, mode, contender):
    cfg = model_config()
    benchmark.group = f"model | {cfg.name} b{cfg.batch} | {precision} | {mode}"
    reason = _skip_reason(cfg, precision, mode, contender, bench_device)
    if reason:
        pytest.skip(reason)
    import pace

    model = _pace_model(cfg, bench_device)
    pace.set_sigma(model, 0.0 if mode == "baseline" else SIGMA)
    pace.set_backend(model, "triton" if contender == "fused" else "torch")
    run_model = torch.compile(model) if contender == "compiled" else model
    crit = _criterion(mode, cfg, bench_device)
    call = _make_steps(run_model, crit, cfg, precision, bench_device)

    cuda = bench_device == "cuda"
    rounds = int(os.environ.get("PACE_BENCH_MODEL_ROUNDS", 4 if cuda else 3))
    median = timing.run(benchmark, call, warmup=2 if cuda else 1, rounds=rounds, round_s=0.0)
    loss = call.state["loss"].detach()
    assert torch.isfinite(loss).all(), f"{mode}/{contender}: non-finite loss {loss}"
    memory = timing.memory
    images = cfg.batch * STEPS_PER_CALL
    benchmark.extra_info.update(
        kind="model",
        model=cfg.name,
        batch=cfg.batch,
        img_size=cfg.img_size,
        adapter="lora_mul_vpt_add",
        rank=10,
        sigma=0.0 if mode == "baseline" else SIGMA,
        mode=mode,
        contender=contender,
        precision=precision,
        device=bench_device,
        steps_per_call=STEPS_PER_CALL,
        images_per_call=images,
        time_median_s=median,
        images_per_s=None if median is None else images / median,
        **memory,
    )
