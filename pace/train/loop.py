"""The fine-tuning loop: AdamW, cosine decay after linear warm-up, the PACE criterion, diagnostics,
atomic per-epoch checkpoints, exact resume, data-parallel ranks.

Exact resume: a checkpoint is taken at an epoch boundary and holds everything the next step reads
(the trainable tensors, AdamW's moments, the schedule's position, the loss scaler, the PACE_fast
bank, the global step, and every random stream: torch, CUDA, numpy, Python and the generator
that orders the data, for every rank). A resumed run rebuilds the model as the first run did,
then overwrites all of that, so it continues with bit-identical numbers on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

import pace

from . import distributed as D
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    atomic_save,
    atomic_write_text,
    capture_rng,
    load_training_checkpoint,
    restore_rng,
)
from .data import ShardedBatchSampler, shard_indices
from .errors import NonFiniteLossError, UsageError
from .metrics import MetricsLog, peak_memory_mb, read_metrics, reset_peak_memory
from .plots import plot_runs

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    wd: float = 1e-4
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01  # the PACE code decays 1e-3 to 1e-5
    pace: str = "none"
    lam: float = 1.0
    copies: int = 2
    lazy_interval: int = 2
    amp: str = "none"
    compile: bool = False
    eval_every: int = 1
    seed: int = 0
    workers: int = 0
    resume: bool = False
    stop_after_epoch: Optional[int] = None
    fp_batch: int = 64
    eval_batch_size: int = 256
    label: str = "train"
    progress: bool = True
    epoch_lines: bool = False
    debug_nan_step: Optional[int] = None
    debug_dump: Optional[str] = None
    # values that must match for --resume to continue the same run (model, adapter, sigma, ...)
    identity: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    label: str
    acc: float
    train_acc: float
    grad_norm: float
    fp_distance: float
    seconds: float
    peak_mem_mb: float
    steps: int
    epochs_done: int
    finished: bool
    out_dir: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    """lr factor of step ``s`` (0-based): linear warm-up to 1 over ``warmup_steps``, then cosine to
    ``min_ratio`` at the last step."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (s - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _collate_first(ds: Dataset, n: int) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Dataset, cfg: TrainConfig, env: D.DistEnv, device: torch.device, amp
) -> float:
    """Top-1 accuracy over the whole set; each rank scores its share and the counts are summed."""
    model.eval()
    part = Subset(ds, shard_indices(len(ds), env.rank, env.world_size))
    # A loader without a generator draws its workers' base seed from the global torch stream, which
    # the PACE noise uses: evaluating would shift the noise of every later step, so the result
    # would depend on --eval-every (and a --resume with another --eval-every would drift silently).
    loader = DataLoader(
        part,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.workers,
        shuffle=False,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    correct = total = 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp():
            pred = model(x).argmax(-1)
        correct += int((pred == y).sum())
        total += y.numel()
    correct, total = D.all_reduce_sum([correct, total], env, device)
    return correct / max(total, 1)


def _amp_context(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext
    dtype = AMP_DTYPES[cfg.amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


def _check_identity(saved: Dict[str, Any], now: Dict[str, Any], path: Path) -> None:
    for key, value in now.items():
        if key in saved and saved[key] != value:
            what = "class-count mismatch: " if key == "num_classes" else ""
            raise UsageError(
                f"{what}--resume: {path} was written with {key}={saved[key]!r}, this run has {key}={value!r}"
            )


def run_training(
    model: nn.Module,
    train_ds: Dataset,
    eval_ds: Dataset,
    num_classes: int,
    cfg: TrainConfig,
    out_dir: Path,
    env: D.DistEnv,
    device: torch.device,
    export: Optional[str] = None,
    export_meta: Optional[Dict[str, str]] = None,
) -> RunResult:
    """Fine-tune the trainable tensors of an injected ``model``; write metrics, checkpoints, the
    adapter and the curves under ``out_dir`` (rank 0 only)."""
    out_dir = Path(out_dir)
    main = env.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable tensors")
    D.broadcast_parameters(params, env)

    identity = dict(
        cfg.identity,
        num_classes=num_classes,
        num_train=len(train_ds),
        pace=cfg.pace,
        lam=cfg.lam,
        copies=cfg.copies,
        lazy_interval=cfg.lazy_interval,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        wd=cfg.wd,
        warmup_epochs=cfg.warmup_epochs,
        seed=cfg.seed,
        amp=cfg.amp,
        trainable=names,
    )

    # Streams: the data order is the same on every rank; noise and augmentation differ per rank.
    data_gen = torch.Generator()
    data_gen.manual_seed(cfg.seed)
    seed_everything(cfg.seed + env.rank)

    sampler = ShardedBatchSampler(len(train_ds), cfg.batch_size, data_gen, env.rank, env.world_size)
    loader = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        generator=data_gen,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_with_warmup(total_steps, warmup_steps, cfg.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    fast = cfg.pace == "fast"
    crit = pace.PaceCriterion(
        mode=cfg.pace,
        lam=cfg.lam,
        copies=cfg.copies,
        lazy_interval=cfg.lazy_interval,
        num_samples=len(train_ds) if fast else None,
        num_classes=num_classes if fast else None,
    ).to(device)
    amp = _amp_context(cfg, device)
    fwd_model = torch.compile(model) if cfg.compile else model

    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, step, keep_lines = 0, 0, None
    if cfg.resume and ckpt_path.exists():
        ck = load_training_checkpoint(ckpt_path)
        _check_identity(ck.get("identity", {}), identity, ckpt_path)
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(ck["adapter"][n])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("epochs") != cfg.epochs:
            D_log(
                f"[{cfg.label}] note: checkpoint planned {ck.get('epochs')} epochs, now {cfg.epochs}: "
                "the cosine schedule is recomputed, so the result will differ from an uninterrupted run",
                main,
            )
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        crit.load_state_dict(ck["criterion"])
        rngs = ck["rng"]
        if len(rngs) == env.world_size:
            restore_rng(rngs[env.rank], data_gen)
        else:
            D_log(
                f"[{cfg.label}] note: checkpoint from {len(rngs)} process(es), now {env.world_size}: "
                "random streams are re-seeded",
                main,
            )
            restore_rng(rngs[0], data_gen)
            seed_everything(cfg.seed + env.rank + 7919 * ck["epoch"])
        start_epoch, step, keep_lines = ck["epoch"], ck["step"], ck["metrics_lines"]
        D_log(f"[{cfg.label}] resumed from {ckpt_path} at epoch {start_epoch}, step {step}", main)
    elif cfg.resume:
        D_log(f"[{cfg.label}] --resume: no checkpoint in {out_dir}, starting from the beginning", main)

    log = MetricsLog(
        out_dir / "metrics.jsonl" if main else None, keep_lines=keep_lines if cfg.resume else None
    )
    fp_x = _collate_first(eval_ds, cfg.fp_batch).to(device)
    seen_indices: List[torch.Tensor] = []

    from tqdm import tqdm

    bar = tqdm(
        total=steps_per_epoch * (cfg.epochs - start_epoch),
        desc=cfg.label,
        unit="step",
        leave=True,
        disable=not (main and cfg.progress),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    reset_peak_memory(device)
    run_t0 = time.perf_counter()
    last = {
        "grad_norm": float("nan"),
        "fp_distance": float("nan"),
        "val_acc": float("nan"),
        "train_acc": float("nan"),
    }
    finished = start_epoch >= cfg.epochs
    peak = 0.0
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            n_img = correct = count = 0
            loss_sum = 0.0
            epoch_gnorms: List[float] = []
            for x, y, idx in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                idx = torch.as_tensor(idx).to(device)
                with amp():
                    out = crit(fwd_model, x, y, index=idx, step=step)
                loss = out.loss
                if cfg.debug_nan_step is not None and step == cfg.debug_nan_step:
                    loss = loss * float("nan")
                stats = D.all_reduce_sum(
                    [
                        loss.detach().item(),
                        out.cls_loss.detach().item(),
                        out.consistency.detach().item(),
                        0.0 if torch.isfinite(loss.detach()) else 1.0,
                    ],
                    env,
                    device,
                )
                if stats[3] > 0:
                    kept = (
                        f"{ckpt_path} (epoch {epoch})"
                        if epoch > start_epoch or (cfg.resume and start_epoch)
                        else None
                    )
                    where = (
                        f"the last good checkpoint {kept} is kept"
                        if kept
                        else "no checkpoint was written yet"
                    )
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.detach().item()}) at epoch {epoch + 1}, step {step + 1}: "
                        f"stopping; {where}"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                D.average_gradients(params, env)
                scaler.unscale_(opt)
                grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
                scaler.step(opt)
                scaler.update()
                lr = opt.param_groups[0]["lr"]
                sched.step()
                if fast and env.enabled:
                    # A sample may sit on another rank next epoch: every rank writes every rank's rows,
                    # so each holds the whole, identical bank.
                    all_idx, all_logits = D.all_gather_rows(idx, out.logits, env)
                    crit.update_bank(all_idx, all_logits)
                if cfg.debug_dump:
                    seen_indices.append(idx.detach().cpu())
                step += 1
                n_img += x.shape[0]
                with torch.no_grad():
                    correct += int((out.logits.argmax(-1) == out.targets).sum())
                    count += out.targets.numel()
                loss_sum += stats[0] / env.world_size
                log.write(
                    {
                        "type": "step",
                        "epoch": epoch + 1,
                        "step": step,
                        "lr": lr,
                        "loss": stats[0] / env.world_size,
                        "cls_loss": stats[1] / env.world_size,
                        "consistency": stats[2] / env.world_size,
                        "grad_norm": grad_norm,
                    }
                )
                epoch_gnorms.append(grad_norm)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{stats[0] / env.world_size:.3f}", gnorm=f"{grad_norm:.3g}", refresh=False
                )

            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            n_img_all, correct, count = D.all_reduce_sum([n_img, correct, count], env, device)
            peak = max(peak, peak_memory_mb(device))
            train_acc = correct / max(count, 1)
            last["grad_norm"] = sum(epoch_gnorms) / max(len(epoch_gnorms), 1)
            img_s = n_img_all / max(seconds, 1e-9)
            log.write(
                {
                    "type": "epoch",
                    "epoch": epoch + 1,
                    "step": step,
                    "train_loss": loss_sum / max(steps_per_epoch, 1),
                    "train_acc": train_acc,
                    "grad_norm_mean": last["grad_norm"],
                    "seconds": seconds,
                    "img_per_s": img_s,
                    "peak_mem_mb": peak,
                }
            )
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                val_acc = evaluate(model, eval_ds, cfg, env, device, amp)
                with amp():
                    fp = float(pace.fp_distance(model, fp_x))
                last.update(val_acc=val_acc, train_acc=train_acc, fp_distance=fp)
                log.write(
                    {
                        "type": "eval",
                        "epoch": epoch + 1,
                        "step": step,
                        "train_acc": train_acc,
                        "val_acc": val_acc,
                        "fp_distance": fp,
                    }
                )
                bar.set_postfix(
                    loss=f"{loss_sum / max(steps_per_epoch, 1):.3f}", val_acc=f"{100 * val_acc:.1f}%"
                )
            if cfg.epoch_lines and main:
                bar.write(
                    f"[{cfg.label}] epoch {epoch + 1}/{cfg.epochs}: {img_s:.1f} img/s, peak memory "
                    f"{peak:.0f} MB, train acc {100 * train_acc:.1f}%"
                    + (f", val acc {100 * last['val_acc']:.2f}%" if (epoch + 1) % cfg.eval_every == 0 else "")
                )

            _save_checkpoint(
                ckpt_path,
                epoch + 1,
                step,
                names,
                params,
                opt,
                sched,
                scaler,
                crit,
                data_gen,
                log,
                identity,
                cfg,
                env,
            )
            if (
                cfg.stop_after_epoch is not None
                and epoch + 1 >= cfg.stop_after_epoch
                and epoch + 1 < cfg.epochs
            ):
                D_log(
                    f"[{cfg.label}] stopping after epoch {epoch + 1} as asked (--stop-after-epoch); "
                    f"continue with --resume",
                    main,
                )
                break
        else:
            finished = True
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - run_t0

    if finished and start_epoch >= cfg.epochs:  # a resumed run that had already finished
        if main and (out_dir / "metrics.jsonl").exists():
            records = read_metrics(out_dir / "metrics.jsonl")
            evals = [r for r in records if r.get("type") == "eval"]
            epochs = [r for r in records if r.get("type") == "epoch"]
            if evals:
                last.update({k: evals[-1][k] for k in ("val_acc", "train_acc", "fp_distance")})
            if epochs:
                last["grad_norm"] = epochs[-1]["grad_norm_mean"]
        last = D.broadcast_object(last, env)

    if cfg.debug_dump:
        dump = Path(cfg.debug_dump)
        dump.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "seen": torch.cat(seen_indices) if seen_indices else torch.zeros(0, dtype=torch.long),
                "bank": None if crit.history_bank is None else crit.history_bank.detach().cpu(),
                "initial_seed": torch.initial_seed(),
                "world_size": env.world_size,
            },
            dump / f"rank{env.rank}.pt",
        )

    result = RunResult(
        cfg.label,
        last["val_acc"],
        last["train_acc"],
        last["grad_norm"],
        last["fp_distance"],
        seconds,
        peak,
        step,
        epoch + 1 if not finished else cfg.epochs,
        finished,
        str(out_dir),
    )
    if main:
        if finished:
            pace.save_adapter(model, out_dir / "adapter")
        atomic_write_text(out_dir / "result.json", json.dumps(result.as_dict(), indent=2) + "\n")
        records = read_metrics(out_dir / "metrics.jsonl")
        plot_runs({cfg.label: records}, out_dir / "curves.png", title=cfg.label)
        if finished and export:
            export_merged(model, export, export_meta or {})
    D.barrier(env)
    return result


def D_log(msg: str, enabled: bool) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _save_checkpoint(
    path, epoch, step, names, params, opt, sched, scaler, crit, data_gen, log, identity, cfg, env
):
    rngs = D.all_gather_object(capture_rng(data_gen), env)  # every rank's streams, saved by rank 0
    if env.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "epochs": cfg.epochs,
            "step": step,
            "world_size": env.world_size,
            "adapter": {n: p.detach().cpu().clone() for n, p in zip(names, params)},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "criterion": {k: v.detach().cpu() for k, v in crit.state_dict().items()},
            "rng": rngs,
            "metrics_lines": log.lines,
            "identity": identity,
        }
        atomic_save(state, path)
    D.barrier(env)


def export_merged(model: nn.Module, path: str, meta: Dict[str, str]) -> Path:
    """Fold the adapters into plain layers (in place: training is over) and write the model's
    weights as one safetensors file."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    pace.merge(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pace-merged", **{k: str(v) for k, v in meta.items()}}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
