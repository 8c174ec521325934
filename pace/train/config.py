"""The settings of one ``pace-train`` run, with every default in one place.

:class:`RunConfig`'s field defaults are the ``--data`` defaults; :data:`DIGITS_PRESET` overrides
some of them for the built-in digits experiment, and :data:`MODE_SIGMA_LAM` holds the per-objective
noise and consistency strength of each. The command line leaves unset flags out, so a run's
settings are ``RunConfig(**{**preset, **given})``; its help text is built from the same tables.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

from ..config import ADAPTER_KINDS, DEFAULT_ADAPTER
from ..losses import MODES

# the library's lists, the default adapter first
ADAPTERS = (DEFAULT_ADAPTER, *(kind for kind in ADAPTER_KINDS if kind != DEFAULT_ADAPTER))
PACE_MODES = MODES
DEFAULT_OUT = os.path.join("runs", "pace-train")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run; the defaults are those of ``--data``."""

    # model and data
    model: str = "vit_base_patch16_224"
    model_kwargs: Optional[Dict[str, Any]] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    partial_checkpoint: bool = False
    data: Optional[str] = None
    split: Optional[str] = None
    eval_split: Optional[str] = None
    num_classes: Optional[int] = None
    img_size: int = 224
    augment: str = "none"
    normalize: str = "imagenet"
    # adapter and objective; sigma / lam None: the objective's value in MODE_SIGMA_LAM
    adapter: str = DEFAULT_ADAPTER
    rank: int = 10
    pace: Optional[str] = None
    lam: Optional[float] = None
    sigma: Optional[float] = None
    lazy_interval: int = 2
    copies: int = 2
    # optimisation: AdamW, linear warm-up then cosine decay to min_lr_ratio * lr
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    wd: float = 1e-4
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.01  # the PACE code decays 1e-3 to 1e-5
    drop_path: float = 0.1
    # the run
    amp: str = "auto"
    compile: bool = False
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    out: str = DEFAULT_OUT
    resume: bool = False
    resume_new_optim: bool = False
    overwrite: bool = False
    stop_after_epoch: Optional[int] = None
    eval_every: int = 10
    eval_batch_size: int = 256
    workers: Optional[int] = None  # None: min(4, CPUs) with --data, 0 for the digits
    export: Optional[str] = None
    threads: Optional[int] = None
    progress: bool = True
    epoch_lines: bool = True
    label: str = "train"
    # the built-in digits experiment
    shots: int = 10
    repeats: int = 5
    pretrain_epochs: int = 20
    # studies around it (pace.train.studies): the validation search, the lambda sweep of Fig. 4
    search: bool = False
    sweep_lam: Optional[Tuple[float, ...]] = None

    def fingerprint(self) -> Dict[str, Any]:
        """The settings a ``--resume`` must find unchanged to continue the same run."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_FINGERPRINT}


# Settings that do not change the numbers a run computes (where and how fast it runs, what it
# reports, when it stops), plus the epoch count, which a resume may extend (see the loop).
NOT_IN_FINGERPRINT = frozenset(
    {
        "out",
        "resume",
        "resume_new_optim",
        "overwrite",
        "stop_after_epoch",
        "eval_every",
        "eval_batch_size",
        "workers",
        "export",
        "threads",
        "progress",
        "epoch_lines",
        "label",
        "device",
        "repeats",
        "epochs",
        "search",
        "sweep_lam",
    }
)
# What --resume-new-optim lets a resume change.
OPTIMISATION_SETTINGS = frozenset({"lr", "wd", "warmup_epochs", "min_lr_ratio", "seed", "epochs"})

DIGITS_PRESET: Dict[str, Any] = {
    "model": "vit_tiny_patch16_224",  # shrunk by DIGITS_MODEL_KWARGS
    "img_size": 16,
    "rank": 4,
    "epochs": 40,
    "batch_size": 10,
    "lr": 3e-2,  # chosen on the validation digits: pace-train --search (see README)
    "warmup_epochs": 4.0,
    "drop_path": 0.0,
    "eval_every": 5,
    "workers": 0,
    "epoch_lines": False,
}
# A ViT small enough for two CPU cores: 16x16 inputs in 4x4 patches (16 tokens + class token).
DIGITS_MODEL_KWARGS = {"patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4}

# (sigma, lam) per objective. --data: the PACE code's README values (VTAB CIFAR: lam 1, sigma 1.2);
# fast wants a larger sigma and a smaller lam, lazy a larger lam. Digits: chosen on the validation
# digits (never the test digits) by `pace-train --search --repeats 1` (pace.train.studies: lr in
# {3e-3, 1e-2, 3e-2} for the baseline, then sigma in {0.5, 1} x lam in {0.5, 2} per objective);
# fpa was not searched.
MODE_SIGMA_LAM: Dict[str, Dict[str, Tuple[float, float]]] = {
    "data": {
        "none": (0.0, 0.0),
        "pace": (1.2, 1.0),
        "fast": (1.5, 0.5),
        "lazy": (1.2, 2.0),
        "fpa": (0.0, 1.0),
    },
    "digits": {
        "none": (0.0, 0.0),
        "pace": (0.5, 2.0),
        "fast": (1.0, 0.5),
        "lazy": (1.0, 0.5),
        "fpa": (0.0, 1.0),
    },
}


def preset_name(data: Optional[str]) -> str:
    return "digits" if data is None else "data"


def build_config(given: Dict[str, Any]) -> RunConfig:
    """The run's settings from the flags that were given (unset flags absent from ``given``)."""
    preset = DIGITS_PRESET if given.get("data") is None else {}
    names = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"unknown settings {unknown}")
    values = {**preset, **given}
    if values.get("workers") is None:
        values["workers"] = min(4, os.cpu_count() or 1)
    return RunConfig(**values)


def for_objective(cfg: RunConfig, mode: str) -> RunConfig:
    """``cfg`` for one objective: its sigma and lam filled in where the user gave none."""
    from dataclasses import replace

    sigma, lam = MODE_SIGMA_LAM[preset_name(cfg.data)][mode]
    return replace(
        cfg,
        pace=mode,
        sigma=sigma if cfg.sigma is None else cfg.sigma,
        lam=0.0 if mode == "none" else (lam if cfg.lam is None else cfg.lam),
    )


def default_text(name: str, fmt: str = "{}") -> str:
    """Help text naming a setting's default with --data and for the built-in experiment."""
    data = fmt.format(getattr(RunConfig, name))
    digits = fmt.format(DIGITS_PRESET.get(name, getattr(RunConfig, name)))
    if name == "model":
        digits = "a 4-block ViT at 16 px"
    return f"default: {data} with --data, {digits} for the built-in default"
