"""The built-in experiment (docs/design.md section 11): a small ViT on digits 0-4, adapted to 5-9."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.utils import random_seed

from . import distributed as dist
from .checkpoint import atomic_write_text, load_training_checkpoint, refuse_existing, save_weights
from .config import DIGITS_MODEL_KWARGS, DIGITS_PRESET, RunConfig, for_objective
from .data import DataBundle, TensorImages
from .loop import RunResult, check_fingerprint, log, run_training
from .metrics import plot_runs, read_metrics
from .model import add_adapters, count_parameters, create_timm_model
from .studies import TABLE_NOTES, MethodRuns, format_table, paired_summary

# (table name, --pace mode) in the order of the table.
VARIANTS = (("baseline", "none"), ("PACE", "pace"), ("PACE_fast", "fast"), ("PACE_lazy", "lazy"))
TABLE_NAMES = {mode: name for name, mode in VARIANTS}
NUM_CLASSES = 5  # digits 0-4 to pre-train on, 5-9 to adapt to


# Pre-training: full training of the small ViT on digits 0-4 (every setting shapes the backbone).
PRETRAIN = dict(
    pace="none", lam=0.0, sigma=0.0, batch_size=64, lr=2e-3, wd=0.05, warmup_epochs=1.0, drop_path=0.0
)


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """The settings of the backbone's pre-training on digits 0-4."""
    kept = {k: getattr(cfg, k) for k in ("model", "model_kwargs", "img_size", "seed", "amp", "progress")}
    epochs = dict(epochs=cfg.pretrain_epochs, eval_every=cfg.pretrain_epochs)
    return RunConfig(**kept, **PRETRAIN, **epochs, workers=0, epoch_lines=False, label="pre-train 0-4")


def backbone_key(cfg: RunConfig) -> str:
    blob = json.dumps(pretrain_config(cfg).fingerprint(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digits_tensors(img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``[N, 1, img_size, img_size]`` in [-1, 1] (bilinear upscaling) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, torch.tensor(d.target, dtype=torch.long)


def split_pretrain(x: torch.Tensor, y: torch.Tensor, seed: int) -> DataBundle:
    """Digits 0-4 for pre-training: 80 % to train on, 20 % to report the backbone's accuracy."""
    old = torch.nonzero(y < 5).flatten()
    old = old[torch.randperm(old.numel(), generator=torch.Generator().manual_seed(seed))]
    train, held_out = old[: int(0.8 * old.numel())], old[int(0.8 * old.numel()) :]
    return DataBundle(TensorImages(x[train], y[train]), TensorImages(x[held_out], y[held_out]), NUM_CLASSES)


# The cut of the 5-9 digits into a development half (shots and validation) and a test half does
# not depend on --seed: every draw and every run is tested on the same images.
TEST_SPLIT_SEED = 15


@dataclass
class NewTask:
    """Digits 5-9 as labels 0-4: the shots to train on, the validation and the test images."""

    train: TensorImages
    val: TensorImages
    test: TensorImages


def split_new_task(x: torch.Tensor, y: torch.Tensor, shots: int, seed: int) -> NewTask:
    """Per digit 5-9: half the images (fixed) for testing; from the other half ``shots`` to train on
    (drawn with ``seed``) and the rest for validation. Train, validation and test are disjoint."""
    fixed = torch.Generator().manual_seed(TEST_SPLIT_SEED)
    draw = torch.Generator().manual_seed(seed)
    parts = []  # per digit: (train, val, test) indices
    for c in range(5, 10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=fixed)]
        dev, test = idx[: idx.numel() // 2], idx[idx.numel() // 2 :]
        if shots >= dev.numel():
            raise ValueError(f"shots {shots}: digit {c} has only {dev.numel()} images outside the test half")
        dev = dev[torch.randperm(dev.numel(), generator=draw)]
        parts.append((dev[:shots], dev[shots:], test))
    return NewTask(*(TensorImages(x[i], y[i] - 5) for i in map(torch.cat, zip(*parts))))


def make_model(cfg: RunConfig, drop_path: float) -> nn.Module:
    """The digits ViT (or ``cfg.model``) for one grey channel, with a 5-class head."""
    shrink = DIGITS_MODEL_KWARGS if cfg.model == DIGITS_PRESET["model"] else {}
    shape = dict(img_size=cfg.img_size, kwargs={"in_chans": 1, **shrink, **(cfg.model_kwargs or {})})
    return create_timm_model(cfg.model, NUM_CLASSES, drop_path=drop_path, **shape)


def pretrain(
    cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, out: Path, env: dist.DistEnv, device: torch.device
) -> Dict[str, torch.Tensor]:
    """The backbone pre-trained on digits 0-4 by rank 0, cached in ``out/pretrain`` per settings."""
    cache = out / "pretrain" / "backbone.safetensors"
    meta_path, key, meta = cache.with_suffix(".json"), backbone_key(cfg), {}
    with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: pre-train again
        meta = json.loads(meta_path.read_text()) if env.is_main and cache.is_file() else {}
    if env.is_main and meta.get("key") != key:
        run_dir = out / "pretrain" / key
        # A pre-training run that was killed goes on where it stopped.
        run_cfg = replace(pretrain_config(cfg), resume=(run_dir / "checkpoint.pt").exists())
        random_seed(cfg.seed)
        model = make_model(cfg, drop_path=0.0)
        result = run_training(model, split_pretrain(x, y, cfg.seed), run_cfg, run_dir, dist.DistEnv(), device)
        save_weights(model, cache)
        meta = dict(key=key, val_acc_0_4=result.val_acc, epochs=cfg.pretrain_epochs, seconds=result.seconds)
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
        log(
            f"pre-trained on digits 0-4 in {result.seconds:.1f} s: {100 * result.val_acc:.1f}% on "
            f"held-out 0-4 digits (cached: {cache})"
        )
    elif env.is_main:
        acc = meta.get("val_acc_0_4", float("nan"))
        log(f"using the cached pre-trained backbone {cache} ({100 * acc:.1f}% on held-out 0-4)")
    dist.barrier(env)
    return load_file(str(cache))


class DigitsExperiment:
    """Runs of the experiment (methods x draws of the shots; by default ``cfg``'s) and their checks."""

    def __init__(self, cfg: RunConfig, env: dist.DistEnv, device: torch.device, seeds=None, variants=None):
        self.cfg, self.env, self.device, self.out = cfg, env, device, Path(cfg.out)
        chosen = VARIANTS if cfg.pace is None else [(TABLE_NAMES.get(cfg.pace, cfg.pace), cfg.pace)]
        self.variants = list(variants or chosen)
        self.seeds = list(seeds or [cfg.seed + k for k in range(cfg.repeats)])
        self.fingerprint = {"backbone": backbone_key(cfg), "num_classes": NUM_CLASSES}

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out / name / f"seed{seed}"

    def run_config(self, name: str, mode: str, seed: int) -> RunConfig:
        label = name if len(self.seeds) == 1 else f"{name} seed {seed}"
        export = _export_path(self.cfg.export, name, seed, len(self.variants) * len(self.seeds))
        return replace(for_objective(self.cfg, mode), seed=seed, label=label, export=export)

    def check_before_training(self) -> None:
        """Refuse, before minutes of pre-training, a run folder or a checkpoint that training would refuse."""
        for name, mode in self.variants:
            for seed in self.seeds:
                folder = self.run_dir(name, seed)
                refuse_existing(folder, self.cfg.resume, self.cfg.overwrite)
                path = folder / "checkpoint.pt"
                if self.cfg.resume and path.exists():
                    expected = {**self.run_config(name, mode, seed).fingerprint(), **self.fingerprint}
                    saved = load_training_checkpoint(path)["fingerprint"]
                    check_fingerprint(saved, expected, path, self.cfg.resume_new_optim, partial=True)

    def digits(self) -> tuple:
        """``(x, y, backbone)``: every digit and the backbone pre-trained on 0-4 (or its cached copy)."""
        x, y = digits_tensors(self.cfg.img_size)
        return x, y, pretrain(self.cfg, x, y, self.out, self.env, self.device)

    def study(self, digits, folder: str, name: str, mode: str, **settings) -> List[RunResult]:
        """One method's runs with other ``settings`` in ``out/folder``, never scored on the test digits."""
        cfg = replace(self.cfg, out=str(self.out / folder), **settings)
        experiment = DigitsExperiment(cfg, self.env, self.device, self.seeds, [(name, mode)])
        experiment.check_before_training()
        return experiment.run_all(digits, score_test=False)[0].runs

    def run_all(self, digits, score_test: bool = True) -> List[MethodRuns]:
        """Every method on every draw (``score_test=False``, the studies: the test digits stay untouched)."""
        rows = [MethodRuns(name, []) for name, _ in self.variants]
        for row, (name, mode) in zip(rows, self.variants):
            for seed in self.seeds:
                first = row is rows[0] and not row.runs
                row.runs.append(self.adapt(digits, name, mode, seed, first, score_test))
        return rows

    def run(self) -> int:
        """The no-argument experiment: pre-train (or reuse) the backbone, run, print and write the table."""
        cfg, env = self.cfg, self.env
        self.check_before_training()
        started = time.perf_counter()
        x, y = digits_tensors(cfg.img_size)
        task = split_new_task(x, y, cfg.shots, self.seeds[0])
        log(
            "pace-train built-in default: pre-train a ViT on digits 0-4, adapt to digits 5-9 from "
            f"{cfg.shots} shots/class ({5 * cfg.shots} images, {len(self.seeds)} draw(s)); validate on "
            f"{len(task.val)} and test on {len(task.test)} other 5-9 digits; output in {self.out}",
            env.is_main,
        )
        rows = self.run_all((x, y, pretrain(cfg, x, y, self.out, env, self.device)))
        if env.is_main:
            self.report(rows, task, time.perf_counter() - started)
        return 0

    def adapt(self, digits, name: str, mode: str, seed: int, first: bool, score_test: bool) -> RunResult:
        """One method on one draw of the shots; ``digits`` is ``(x, y, pre-trained backbone)``."""
        cfg, (x, y, backbone) = self.cfg, digits
        task = split_new_task(x, y, cfg.shots, seed)
        run_cfg = self.run_config(name, mode, seed)
        random_seed(seed)  # every method of one draw starts from the same head and adapters
        model = make_model(cfg, drop_path=cfg.drop_path)
        model.load_state_dict({k: v for k, v in backbone.items() if not k.startswith("head.")}, strict=False)
        add_adapters(model, cfg.adapter, cfg.rank, run_cfg.sigma, cfg.backend)
        if first:
            adapter = f"adapter {cfg.adapter}, rank {cfg.rank}"
            log(f"model: {cfg.model} {count_parameters(model)} ({adapter})", self.env.is_main)
        data = DataBundle(task.train, task.val, NUM_CLASSES, test=task.test if score_test else None)
        folder = self.run_dir(name, seed)
        return run_training(model, data, run_cfg, folder, self.env, self.device, self.fingerprint)

    def report(self, rows: List[MethodRuns], task: NewTask, total: float) -> None:
        cfg, seeds = self.cfg, self.seeds
        chosen = {n: for_objective(cfg, m) for n, m in self.variants}
        sigma_lam = ", ".join(
            f"{n}: sigma {c.sigma:g} lam {c.lam:g}" for n, c in chosen.items() if c.pace != "none"
        )
        header = (
            f"digits 5-9 from {cfg.shots} shots/class, {len(seeds)} draw(s) (seeds {seeds[0]}..{seeds[-1]}), "
            f"frozen ViT pre-trained on 0-4; adapter {cfg.adapter} rank {cfg.rank}; lr {cfg.lr:g}, batch "
            f"{cfg.batch_size}, {cfg.epochs} epochs; {sigma_lam}\n"
            f"test accuracy on {len(task.test)} 5-9 digits (scored once per run); val: {len(task.val)} other "
            "5-9 digits"
        )
        table = format_table(rows, self.device)
        where = f"total {total:.1f} s on {self.device.type}; outputs in {self.out}"
        print(f"\n{header}\n{table}\n{TABLE_NOTES}\n{where}\n", flush=True)
        settings = {n: {"sigma": c.sigma, "lam": c.lam} for n, c in chosen.items()}
        summary = {
            "header": header,
            "table": table,
            "notes": TABLE_NOTES,
            "total_seconds": total,
            "seeds": seeds,
            "hyperparameters": {"lr": cfg.lr, "batch_size": cfg.batch_size, "epochs": cfg.epochs, **settings},
            "paired": paired_summary(rows),
            "results": {row.name: [asdict(r) for r in row.runs] for row in rows},
        }
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(self.out / "summary.txt", f"{header}\n{table}\n{TABLE_NOTES}\n")
        runs = {row.name: read_metrics(Path(row.runs[0].out_dir) / "metrics.jsonl") for row in rows}
        plot_runs(runs, self.out / "curves.png", title=f"{header}\n(first draw, seed {seeds[0]})")


def _export_path(export: Optional[str], name: str, seed: int, n_runs: int) -> Optional[str]:
    if export is None or n_runs == 1:
        return export
    p = Path(export)
    return str(p.with_name(f"{p.stem}-{name}-seed{seed}{p.suffix or '.safetensors'}"))
