"""Model benchmarks: one training step (forward, backward, AdamW) per model, precision, mode and contender.

ViT (:func:`bench.models.build_vit`): on CUDA timm ViT-B/16 (random weights, drop_path 0.1 as the
public PACE code), batch 64, 224 px, ``lora_mul_vpt_add`` rank 10 in every linear layer, at bf16
autocast and at fp32 (the public code's precision); on CPU a tiny ViT (32 px, depth 2, batch 8,
fp32). Modes (docs/design.md section 5): ``baseline`` (sigma 0, cross-entropy only), ``pace`` (two copies, 2B
rows), ``fast`` (one copy, history bank), ``lazy`` (lazy_half, N = 2). Contenders: ``reference``
(``backend="torch"``), ``fused`` (``backend="triton"``, CUDA only), ``compiled`` (``torch.compile`` of
the reference model) and ``peft`` (PEFT's GLoRA layers in ``lora_mul_vpt_add`` form with PACE's noise
on their adapter term; baseline and pace). The peft model's first PACE loss must equal the
reference's (same weights, same noise draws) before it is timed.

Llama (:func:`bench.models.build_llama`): a ``LlamaForCausalLM`` from a config (random weights; on
CUDA two 4096-wide Llama-2-7B layers, vocabulary 32000, batch 2 of 2048 tokens, weights and adapters
in bf16; on CPU a tiny one), ``lora_add`` rank 8 in every projection, next-token prediction:
``baseline`` (cross-entropy) and ``pace`` (two copies, token-level consistency); contenders
``reference``, ``fused`` and ``compiled``. Skipped when transformers is missing.

Compiling a training graph costs close to a minute per variant on CUDA, so by default only the pace
steps (ViT at bf16) are compiled (``PACE_BENCH_MODEL_COMPILE=all|pace|none``; on CPU none by
default). The cases run in priority order, so a run cut short by its time budget keeps the bf16
ViT and the Llama steps: bf16 ViT baseline and pace, Llama, then the ViT's other modes and fp32.

One benchmark call runs two optimizer steps, so lazy_half's two kinds of step are both in every
round; ``images_per_call`` counts the batch's images (PACE's copies count once), ``tokens_per_call``
the Llama batch's tokens.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from bench import models, specs
from bench.contenders import fused_unavailable_reason

NUM_SAMPLES = 1000  # dataset size for PACE_fast's history bank (VTAB-1k size)
STEPS_PER_CALL = 2
VIT_MODES = ("baseline", "pace", "fast", "lazy")
LLAMA_MODES = ("baseline", "pace")
PEFT_MODES = ("baseline", "pace")
# Relative L2 error of the peft contender's first PACE logits against the reference's (same noise).
_PEFT_TOLERANCE = {"fp32": 1e-3, "bf16-autocast": 3e-2}


def _compile_policy() -> str:
    default = "pace" if specs.device() == "cuda" else "none"
    value = os.environ.get("PACE_BENCH_MODEL_COMPILE", default)
    if value not in ("all", "pace", "none"):
        raise ValueError(f"PACE_BENCH_MODEL_COMPILE must be all, pace or none, got {value!r}")
    return value


def _cases() -> list:
    """(model, precision, mode, contender) in priority order (see the module docstring)."""
    device = specs.device()
    vit = models.vit_config(device)
    llama = models.llama_config(device)
    first_precision = vit.precisions[0]

    def vit_cases(precisions, modes):
        out = []
        for precision in precisions:
            for mode in modes:
                for contender in ("reference", "fused", "compiled", "peft"):
                    if contender == "peft" and mode not in PEFT_MODES:
                        continue
                    out.append(("vit", precision, mode, contender))
        return out

    cases = vit_cases([first_precision], ("baseline", "pace"))
    llama_contenders = ("reference", "fused", "compiled")
    cases += [("llama", llama.precision, mode, c) for mode in LLAMA_MODES for c in llama_contenders]
    cases += vit_cases([first_precision], ("fast", "lazy"))
    cases += vit_cases(vit.precisions[1:], VIT_MODES)
    names = {"vit": vit.name, "llama": llama.name}
    return [pytest.param(m, p, mode, c, id=f"{names[m]}-{p}-{mode}-{c}") for m, p, mode, c in cases]


def _skip_reason(model: str, precision: str, mode: str, contender: str, device: str) -> str | None:
    try:
        import pace  # noqa: F401

        if model == "vit":
            import timm  # noqa: F401
        else:
            import transformers  # noqa: F401
    except ImportError as exc:
        needs = "timm" if model == "vit" else "transformers"
        return f"{model} model benchmarks need pace and {needs} ({exc})"
    if contender == "fused":
        kind = "lora_mul" if model == "vit" else "lora_add"
        return fused_unavailable_reason(specs.Op(kind, 10, "sample"), device)
    if contender == "compiled":
        policy = _compile_policy()
        if policy == "none":
            why = "; on CPU compiling even the tiny model costs more than the reduced budget"
            why = why if device == "cpu" else ""
            return f"compiled model: off (PACE_BENCH_MODEL_COMPILE=none{why})"
        first = models.vit_config(device).precisions[0]
        if policy == "pace" and not (mode == "pace" and (model == "llama" or precision == first)):
            return (
                "compiled model: only the pace steps are compiled by default (a training graph takes "
                "about a minute to compile); PACE_BENCH_MODEL_COMPILE=all compiles every mode"
            )
    return None


_MODELS: dict[str, torch.nn.Module] = {}


def _cached(key: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """One model per session (building ViT-B takes seconds); benchmarks set sigma and backend."""
    if key not in _MODELS:
        _MODELS[key] = build()
    return _MODELS[key]


def _vit_criterion(mode: str, num_classes: int, device: str):
    import pace

    if mode == "baseline":
        return pace.PaceCriterion(mode="none")
    if mode == "pace":
        return pace.PaceCriterion(mode="pace", lam=models.LAM)
    if mode == "fast":
        return pace.PaceCriterion(
            mode="fast", lam=models.LAM, num_samples=NUM_SAMPLES, num_classes=num_classes
        ).to(device)
    if mode == "lazy":
        return pace.PaceCriterion(mode="lazy", lam=models.LAM, lazy_interval=2)
    raise ValueError(mode)


def _make_steps(model, parameters, loss_fn: Callable[[int], torch.Tensor], amp: bool, device: str):
    """``STEPS_PER_CALL`` optimizer steps per call; ``loss_fn(step)`` computes the step's loss."""
    opt = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-4)
    state = {"step": 0, "loss": torch.zeros(())}

    def one_step() -> None:
        step = state["step"]
        state["step"] += 1
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["loss"] = loss

    def call() -> None:
        for _ in range(STEPS_PER_CALL):
            one_step()

    call.state = state  # type: ignore[attr-defined]
    return call


def _vit_inputs(cfg: models.VitConfig, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen).to(device)
    return x, y


def _check_peft_against_reference(peft_model, reference, x, y, precision: str, device: str) -> None:
    """The first PACE logits of both models, same seed (same DropPath masks and noise draws)."""
    import pace

    amp = precision == "bf16-autocast"
    pace.set_backend(reference, "torch")
    pace.set_sigma(reference, models.SIGMA)
    models.set_glora_sigma(peft_model, models.SIGMA)
    crit = pace.PaceCriterion(mode="pace", lam=models.LAM)
    logits = []
    for model in (reference, peft_model):
        torch.manual_seed(123)
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits.append(crit(model, x, y).logits.float())
    err = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    assert err < _PEFT_TOLERANCE[precision], (
        f"peft (GLoRA) disagrees with the reference: rel. error {err:.2e}"
    )


def _vit_call(precision: str, mode: str, contender: str, device: str):
    import pace

    cfg = models.vit_config(device)
    reference = _cached("vit", lambda: models.build_vit(cfg, device))
    x, y = _vit_inputs(cfg, device)
    sigma = 0.0 if mode == "baseline" else models.SIGMA
    if contender == "peft":
        try:
            model = models.build_glora_vit(cfg, device, reference)
        except models.ModelUnavailable as exc:
            pytest.skip(f"peft: {exc}")
        _check_peft_against_reference(model, reference, x, y, precision, device)
        models.set_glora_sigma(model, sigma)
    else:
        model = reference
        pace.set_sigma(model, sigma)
        pace.set_backend(model, "triton" if contender == "fused" else "torch")
    run_model = torch.compile(model) if contender == "compiled" else model
    crit = _vit_criterion(mode, cfg.num_classes, device)

    def loss_fn(step: int) -> torch.Tensor:
        index = (torch.arange(cfg.batch, device=device) + step * cfg.batch) % NUM_SAMPLES
        return crit(run_model, x, y, index=index, step=step).loss

    call = _make_steps(model, pace.trainable_parameters(model), loss_fn, precision == "bf16-autocast", device)
    info = dict(
        model=cfg.name,
        batch=cfg.batch,
        img_size=cfg.img_size,
        adapter=models.VIT_ADAPTER,
        rank=models.VIT_RANK,
        images_per_call=cfg.batch * STEPS_PER_CALL,
    )
    return call, info


def _llama_call(mode: str, contender: str, device: str):
    import pace

    cfg = models.llama_config(device)
    try:
        model = _cached("llama", lambda: models.build_llama(cfg, device))
    except models.ModelUnavailable as exc:
        pytest.skip(f"llama: {exc}")
    pace.set_sigma(model, 0.0 if mode == "baseline" else models.SIGMA)
    pace.set_backend(model, "triton" if contender == "fused" else "torch")
    run_model = torch.compile(model) if contender == "compiled" else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len), generator=gen).to(device)

    def loss_fn(step: int) -> torch.Tensor:
        return models.lm_step_loss(run_model, ids, pace_copies=mode == "pace")

    call = _make_steps(model, pace.trainable_parameters(model), loss_fn, False, device)
    tokens = cfg.batch * cfg.seq_len * STEPS_PER_CALL
    info = dict(
        model=cfg.name,
        batch=cfg.batch,
        seq_len=cfg.seq_len,
        hidden=cfg.hidden,
        layers=cfg.layers,
        adapter=models.LLAMA_ADAPTER,
        rank=models.LLAMA_RANK,
        tokens_per_call=tokens,
        images_per_call=cfg.batch * STEPS_PER_CALL,
    )
    return call, info


@pytest.mark.parametrize("model,precision,mode,contender", _cases())
def test_model_step(benchmark, timing, bench_device, model, precision, mode, contender):
    name = (models.vit_config if model == "vit" else models.llama_config)(bench_device).name
    benchmark.group = f"model | {name} | {precision} | {mode}"
    reason = _skip_reason(model, precision, mode, contender, bench_device)
    if reason:
        pytest.skip(reason)
    if model == "vit":
        call, info = _vit_call(precision, mode, contender, bench_device)
    else:
        call, info = _llama_call(mode, contender, bench_device)

    cuda = bench_device == "cuda"
    rounds = int(os.environ.get("PACE_BENCH_MODEL_ROUNDS", 4 if cuda else 3))
    median = timing.run(benchmark, call, warmup=2 if cuda else 1, rounds=rounds, round_s=0.0)
    loss = call.state["loss"].detach()
    assert torch.isfinite(loss).all(), f"{name} {mode}/{contender}: non-finite loss {loss}"
    per_call = info["images_per_call"]
    benchmark.extra_info.update(
        kind="model",
        sigma=0.0 if mode == "baseline" else models.SIGMA,
        mode=mode,
        contender=contender,
        precision=precision,
        device=bench_device,
        steps_per_call=STEPS_PER_CALL,
        time_median_s=median,
        images_per_s=None if median is None else per_call / median,
        **info,
        **timing.memory,
    )
