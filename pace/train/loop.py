"""The fine-tuning loop (docs/design.md section 11): AdamW, cosine schedule, checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from timm.utils import random_seed
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import pace

from . import checkpoint as ckpt
from . import distributed as dist
from .checkpoint import atomic_write_text
from .config import OPTIMISATION_SETTINGS, RunConfig
from .data import DataBundle, train_batch_sampler
from .metrics import MetricsLog, peak_memory_mb, plot_runs, read_metrics, reset_peak_memory

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SYNC_EVERY = 10  # steps between reads of the step statistics (and progress-bar updates)
STEP_MEANS = ("loss", "cls_loss", "consistency", "train_objective_grad_norm")  # means over ranks


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops and the last checkpoint stays."""


@dataclass
class RunResult:
    """A run's numbers: ``val_*`` at the last evaluation (``val_grad_norm_mean`` over all of them),
    ``train_objective_grad_norm`` over the last epoch, ``test_acc`` once at the end (or NaN)."""

    label: str
    val_acc: float
    train_acc: float
    val_loss: float
    val_grad_norm: float
    val_grad_norm_mean: float
    val_fp_distance: float
    train_objective_grad_norm: float
    test_acc: float
    seconds: float
    peak_mem_mb: float
    steps: int
    epochs_done: int
    finished: bool
    out_dir: str


MEASURED = tuple(  # RunResult's measured values: NaN until measured
    "val_acc train_acc val_loss val_grad_norm val_grad_norm_mean val_fp_distance train_objective_grad_norm "
    "test_acc".split()
)


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def has_adapters(model: nn.Module) -> bool:
    return isinstance(getattr(model, "pace_config", None), pace.PaceConfig)


class _Training:
    """One run of the loop over a model whose trainable tensors are the ones to fit."""

    def __init__(self, model, data: DataBundle, cfg, out_dir, env, device, fingerprint):
        self.model, self.data = model, data
        self.cfg, self.out_dir, self.env, self.device, self.main = cfg, out_dir, env, device, env.is_main
        model.to(device)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable tensors")
        dist.broadcast_parameters(self.params, env)
        n_train = len(data.train)
        self.fingerprint = {**fingerprint, **cfg.fingerprint(), "num_classes": data.num_classes}
        self.fingerprint.update(num_train=n_train, world_size=env.world_size, trainable=self.names)
        random_seed(cfg.seed, env.rank)  # the noise differs per rank; the data order does not
        self.batches = train_batch_sampler(n_train, cfg.batch_size, cfg.seed, env.rank, env.world_size)
        self.loader = self._loader(data.train, batch_sampler=self.batches, pin_memory=device.type == "cuda")
        self.steps_per_epoch = len(self.batches)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.wd)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        bank = dict(num_samples=n_train, num_classes=data.num_classes) if cfg.pace == "fast" else {}
        copies = dict(copies=cfg.copies, lazy_interval=cfg.lazy_interval)
        self.crit = pace.PaceCriterion(cfg.pace, cfg.lam, **copies, **bank).to(device)
        amp_dtype = AMP_DTYPES.get(cfg.amp)
        self.amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        self.forward_model = torch.compile(model) if cfg.compile else model
        self.checkpoint_path = out_dir / "checkpoint.pt"
        self.epoch, self.step, self.peak, self.metrics_bytes = 0, 0, 0.0, None
        self.last = dict.fromkeys(MEASURED, float("nan"))
        self.val_grad_norms: List[float] = []
        self.pending: List[tuple] = []  # step statistics still on the device

    def log(self, message: str) -> None:
        log(f"[{self.cfg.label}] {message}", self.main)

    def _loader(self, ds: Dataset, **kwargs) -> DataLoader:
        # A loader without a generator draws its workers' base seed from the global torch stream, which
        # the PACE noise uses: every later step's noise would depend on the loaders made before it.
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(ds, num_workers=self.cfg.workers, generator=generator, **kwargs)

    def schedule(self) -> CosineLRScheduler:
        cfg, low = self.cfg, self.cfg.lr * self.cfg.min_lr_ratio
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        for group in self.opt.param_groups:
            group.update(lr=cfg.lr, initial_lr=cfg.lr, weight_decay=cfg.wd)
        # t_initial 1 only makes timm warn; the learning rates are those of 2
        t_initial = max(2, self.steps_per_epoch * cfg.epochs - warmup)
        warm = dict(warmup_t=warmup, warmup_lr_init=low, warmup_prefix=True)
        sched = CosineLRScheduler(self.opt, t_initial, lr_min=low, t_in_epochs=False, **warm)
        sched.step_update(self.step)
        return sched

    def resume(self) -> None:
        cfg, env = self.cfg, self.env
        if not self.checkpoint_path.exists():
            return self.log(f"resume: no checkpoint in {self.out_dir}, starting from the beginning")
        ck = ckpt.load_training_checkpoint(self.checkpoint_path)
        check_fingerprint(ck["fingerprint"], self.fingerprint, self.checkpoint_path, cfg.resume_new_optim)
        if ck["epoch"] > cfg.epochs:
            raise ckpt.ResumeError(
                f"{self.checkpoint_path} is at epoch {ck['epoch']}, past the {cfg.epochs} epoch(s) asked for"
            )
        for n, p in zip(self.names, self.params):
            p.data.copy_(ck["adapter"][n])  # .data: written in place, outside autograd
        self.opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.crit.load_state_dict(ck["criterion"])
        self.epoch, self.step, self.metrics_bytes = ck["epoch"], ck["step"], ck["metrics_bytes"]
        self.last, self.val_grad_norms = ck["measured"], ck["val_grad_norms"]
        if len(ck["rng"]) == env.world_size and not cfg.resume_new_optim:
            ckpt.restore_rng(ck["rng"][env.rank])
        else:  # a new run from these weights, or another world size: fresh streams (a NaN is not replayed)
            random_seed(cfg.seed + 7919 * self.epoch, env.rank)
            why = f"checkpoint from {len(ck['rng'])} process(es), now {env.world_size}"
            why = "new optimisation settings" if cfg.resume_new_optim else why
            self.log(f"note: {why}: random streams are re-seeded")
        if ck["epochs"] != cfg.epochs and not cfg.resume_new_optim:
            self.log(
                f"note: checkpoint planned {ck['epochs']} epochs, now {cfg.epochs}: the cosine schedule is "
                "recomputed, so the result will differ from an uninterrupted run"
            )
        self.log(f"resumed from {self.checkpoint_path} at epoch {self.epoch}, step {self.step}")

    def train_epoch(self, sched, metrics: MetricsLog, bar) -> Dict[str, Any]:
        cfg, env, device = self.cfg, self.env, self.device
        self.model.train()
        self.batches.sampler.set_epoch(self.epoch)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(self.epoch)
        started = time.perf_counter()
        records: List[Dict[str, Any]] = []
        images = 0  # on this rank
        for x, y, idx in self.loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            idx = torch.as_tensor(idx)  # stays on the CPU: the criterion checks it without a device sync
            with self.amp():
                out = self.crit(self.forward_model, x, y, index=idx, step=self.step)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
            dist.average_gradients(self.params, env)
            self.scaler.unscale_(self.opt)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            lr = self.opt.param_groups[0]["lr"]
            self.scaler.step(self.opt)
            self.scaler.update()
            if cfg.pace == "fast" and env.enabled:
                # A sample may sit on another rank next epoch: every rank writes every rank's rows.
                self.crit.update_bank(*dist.all_gather_rows(idx.to(device), out.logits, env))
            self.step += 1
            sched.step_update(self.step)
            with torch.no_grad():
                correct = (out.logits.argmax(-1) == out.targets).sum()
                values = [out.loss, out.cls_loss, out.consistency, grad_norm, correct]
                values = torch.stack([t.detach().double() for t in values])
            self.pending.append((self.epoch + 1, self.step, lr, out.targets.numel(), values))
            images += x.shape[0]
            if len(self.pending) >= SYNC_EVERY:
                records += self._write_steps(metrics, bar)
        records += self._write_steps(metrics, bar)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        self.peak = max(self.peak, peak_memory_mb(device))
        total = {
            k: sum(r[k] for r in records) for k in ("loss", "correct", "count", "train_objective_grad_norm")
        }
        steps, count = max(len(records), 1), max(total["count"], 1)
        epoch_record = dict(type="epoch", epoch=self.epoch + 1, step=self.step, seconds=seconds)
        epoch_record.update(peak_mem_mb=self.peak, img_per_s=images * env.world_size / max(seconds, 1e-9))
        epoch_record.update(train_loss=total["loss"] / steps, train_acc=total["correct"] / count)
        epoch_record["train_objective_grad_norm_mean"] = total["train_objective_grad_norm"] / steps
        metrics.write(epoch_record)
        return epoch_record

    def _write_steps(self, metrics: MetricsLog, bar) -> List[Dict[str, Any]]:
        """The pending steps read back in one transfer (means over ranks, sample counts summed),
        checked and written; a NaN/inf loss stops the run here, before any checkpoint."""
        if not self.pending:
            return []
        world = self.env.world_size
        summed = dist.all_reduce_sum(torch.stack([row[-1] for row in self.pending]), self.env).tolist()
        records = [
            dict(type="step", epoch=epoch, step=step, lr=lr, correct=values[4], count=count * world)
            | {key: v / world for key, v in zip(STEP_MEANS, values)}
            for (epoch, step, lr, count, _), values in zip(self.pending, summed)
        ]
        self.pending.clear()
        for r in records:
            if not all(math.isfinite(r[k]) for k in ("loss", "cls_loss", "consistency")):
                where = f"non-finite loss ({r['loss']}) at epoch {r['epoch']}, step {r['step']}: stopping"
                kept = f"the last good checkpoint {self.checkpoint_path} (epoch {r['epoch'] - 1}) is kept"
                if not (self.checkpoint_path.exists() and r["epoch"] > 1):
                    kept = "no checkpoint was written yet"
                raise NonFiniteLossError(f"{where}; {kept}")
            metrics.write({k: v for k, v in r.items() if k not in ("correct", "count")})
        bar.update(len(records))
        loss, gnorm = records[-1]["loss"], records[-1]["train_objective_grad_norm"]
        bar.set_postfix(loss=f"{loss:.3f}", gnorm=f"{gnorm:.3g}", refresh=False)
        return records

    def diagnose(self, ds: Dataset, fp_distance: bool):
        """:func:`pace.heldout_diagnostics` on ``ds`` (eval mode, no noise), each rank measuring its share."""
        part = Subset(ds, range(self.env.rank, len(ds), self.env.world_size))  # each sample on one rank
        loader = self._loader(part, batch_size=self.cfg.eval_batch_size)
        with self.amp():
            return pace.heldout_diagnostics(
                self.model, loader, fp_distance=fp_distance, all_reduce=self.env.enabled
            )

    def evaluate(self, epoch_record: Dict[str, Any], metrics: MetricsLog) -> None:
        """The paper's diagnostics on the evaluation set, in one pass that also scores it."""
        m = self.diagnose(self.data.eval, fp_distance=has_adapters(self.model))
        record = dict(
            val_acc=m.accuracy, val_loss=m.loss, val_grad_norm=m.grad_norm, val_fp_distance=m.fp_distance
        )
        self.val_grad_norms.append(m.grad_norm)
        mean = sum(self.val_grad_norms) / len(self.val_grad_norms)
        self.last.update(record, train_acc=epoch_record["train_acc"], val_grad_norm_mean=mean)
        metrics.write(
            dict(type="eval", epoch=self.epoch, step=self.step, train_acc=self.last["train_acc"], **record)
        )

    def score_test_set(self, metrics: MetricsLog) -> None:
        """The test set, scored once when training is over (never used to choose anything)."""
        self.last["test_acc"] = self.diagnose(self.data.test, fp_distance=False).accuracy
        metrics.write(dict(type="test", epoch=self.epoch, step=self.step, test_acc=self.last["test_acc"]))

    def save_checkpoint(self, metrics: MetricsLog) -> None:
        rngs = dist.all_gather_object(ckpt.capture_rng(), self.env)  # every rank's streams, saved by rank 0
        if self.main:
            metrics.flush()
            state = {
                "format": ckpt.CHECKPOINT_FORMAT,
                "version": ckpt.CHECKPOINT_VERSION,
                "epoch": self.epoch,
                "epochs": self.cfg.epochs,
                "step": self.step,
                "world_size": self.env.world_size,
                "adapter": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "criterion": {k: v.detach().cpu() for k, v in self.crit.state_dict().items()},
                "rng": rngs,
                "metrics_bytes": metrics.bytes,
                "fingerprint": self.fingerprint,
                "measured": self.last,
                "val_grad_norms": self.val_grad_norms,
            }
            ckpt.atomic_save(state, self.checkpoint_path)
        dist.barrier(self.env)

    def run(self) -> RunResult:
        cfg, main = self.cfg, self.main
        if cfg.resume:
            self.resume()
        metrics = MetricsLog(self.out_dir / "metrics.jsonl" if main else None, self.metrics_bytes)
        if metrics.missing_bytes:  # 0 on ranks other than 0
            self.log(
                f"note: {metrics.path} lacks {metrics.missing_bytes} bytes of records the checkpoint had "
                "written (deleted or cut short); those records are lost, training goes on"
            )
        sched = self.schedule()
        total = self.steps_per_epoch * max(0, cfg.epochs - self.epoch)
        shown = dict(desc=cfg.label, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        bar = tqdm(total=total, disable=not (main and cfg.progress), **shown)
        reset_peak_memory(self.device)
        started = time.perf_counter()
        try:
            while self.epoch < cfg.epochs:
                epoch_record = self.train_epoch(sched, metrics, bar)
                self.epoch += 1
                self.last["train_objective_grad_norm"] = epoch_record["train_objective_grad_norm_mean"]
                evaluated = self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs
                if evaluated:
                    self.evaluate(epoch_record, metrics)
                if cfg.epoch_lines and main:
                    speed, acc = epoch_record["img_per_s"], 100 * epoch_record["train_acc"]
                    line = f"[{cfg.label}] epoch {self.epoch}/{cfg.epochs}: {speed:.1f} img/s, "
                    line += f"peak memory {self.peak:.0f} MB, train acc {acc:.1f}%"
                    bar.write(line + (f", val acc {100 * self.last['val_acc']:.2f}%" if evaluated else ""))
                if self.epoch >= cfg.epochs and self.data.test is not None:
                    self.score_test_set(metrics)
                self.save_checkpoint(metrics)
                if cfg.stop_after_epoch is not None and self.epoch >= cfg.stop_after_epoch < cfg.epochs:
                    self.log(f"stopping after epoch {self.epoch} as asked; continue with resume")
                    break
        finally:
            bar.close()
            metrics.close()
        seconds, finished = time.perf_counter() - started, self.epoch >= cfg.epochs
        done = dict(steps=self.step, epochs_done=self.epoch, finished=finished, out_dir=str(self.out_dir))
        return RunResult(cfg.label, **self.last, seconds=seconds, peak_mem_mb=self.peak, **done)


def check_fingerprint(
    saved: Dict[str, Any], now: Dict[str, Any], path: Path, new_optim: bool = False, partial: bool = False
) -> None:
    """Refuse to continue a checkpoint whose run had other settings; ``new_optim`` lets the
    optimisation settings change, ``partial`` compares only the keys of ``now``."""
    ignored = OPTIMISATION_SETTINGS if new_optim else frozenset()
    for key in sorted(set(now) if partial else set(saved) | set(now)):
        was, is_now = saved.get(key), now.get(key)
        if was != is_now and key not in ignored:
            what = "class-count mismatch: " if key == "num_classes" else ""
            raise ckpt.ResumeError(
                f"{what}{path} was written with {key}={was!r}, this run has {key}={is_now!r}"
            )


def run_training(
    model: nn.Module,
    data: DataBundle,
    cfg: RunConfig,
    out_dir: Path,
    env: dist.DistEnv,
    device: torch.device,
    fingerprint: Optional[Dict[str, Any]] = None,
) -> RunResult:
    """Fit ``model``'s trainable tensors on ``data.train`` with ``cfg.pace``, evaluate on ``data.eval``,
    score ``data.test`` (if any) once; write the run's files under ``out_dir`` (rank 0)."""
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as held:
        refusal: Optional[ckpt.RunFolderError] = None
        if env.is_main:
            try:
                held.enter_context(ckpt.claim(out_dir, cfg.resume, cfg.overwrite))
            except ckpt.RunFolderError as exc:
                refusal = exc
        message = dist.broadcast_object(None if refusal is None else str(refusal), env)
        if message is not None:  # every rank stops, not only the one that found the folder taken
            raise refusal or ckpt.RunFolderError(message)
        result = _Training(model, data, cfg, out_dir, env, device, fingerprint or {}).run()
        if env.is_main:
            if result.finished and has_adapters(model):
                pace.save_adapter(model, out_dir / "adapter")
            atomic_write_text(out_dir / "result.json", json.dumps(asdict(result), indent=2) + "\n")
            records = read_metrics(out_dir / "metrics.jsonl")
            plot_runs({cfg.label: records}, out_dir / "curves.png", title=cfg.label)
            if result.finished and cfg.export:
                pace.merge(model)  # in place: the run is over
                meta = {"format": "pace-merged", "model": cfg.model, "num_classes": str(data.num_classes)}
                ckpt.save_weights(model, cfg.export, meta)
        dist.barrier(env)
    return result
