"""A run's settings, defaults and checks; errors name settings in backquotes, which the CLI makes flags."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

from ..config import ADAPTER_KINDS, DEFAULT_ADAPTER
from ..losses import MODES

# the library's lists, the default adapter first
ADAPTERS = (DEFAULT_ADAPTER, *(kind for kind in ADAPTER_KINDS if kind != DEFAULT_ADAPTER))
PACE_MODES = MODES
DEFAULT_OUT = os.path.join("runs", "pace-train")
MAX_SEED = 2**32 - 2**16  # numpy seeds must stay below 2**32, with room for --repeats and ranks
MAX_LR = 10.0  # AdamW steps of that size diverge


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
    pace: Optional[str] = None  # with sweep_lam: a comma-separated list
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

    def __post_init__(self) -> None:
        for name, minimum in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
        for name in ("lam", "sigma", "lr", "wd", "warmup_epochs", "drop_path"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
        checks = [
            (self.drop_path < 1, f"`drop_path` must be below 1, got {self.drop_path}"),
            (self.lr <= MAX_LR, f"`lr` must be at most {MAX_LR:g} (AdamW diverges), got {self.lr}"),
            (0 <= self.seed <= MAX_SEED, f"`seed` must be in 0 .. {MAX_SEED}, got {self.seed}"),
            (isinstance(self.model_kwargs, (dict, type(None))), "`model_kwargs` must be a JSON object"),
            (not (self.pretrained and self.checkpoint), "`pretrained` and `checkpoint` exclude each other"),
            (self.resume or not self.resume_new_optim, "`resume_new_optim` goes with `resume`"),
            (not (self.resume and self.overwrite), "`resume` and `overwrite` exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.data is None:
            if self.pretrained or self.checkpoint:
                raise ValueError(
                    "`pretrained` / `checkpoint` need `data` (the built-in default pre-trains its own)"
                )
            non_default = [f"`{n}`" for n in DATA_ONLY if getattr(self, n) != getattr(RunConfig, n)]
            if non_default:
                raise ValueError(f"{', '.join(non_default)} only apply with `data`")
        modes = self.pace.split(",") if self.pace else []
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(
                f"`pace` must be one of {', '.join(MODES)} (a list only with `sweep_lam`), got {bad[0]!r}"
            )
        if self.sweep_lam is not None:
            if not all(math.isfinite(v) and v > 0 for v in self.sweep_lam):
                raise ValueError(
                    f"`sweep_lam` values must be finite and > 0 (a log axis), got {self.sweep_lam}"
                )
            if "none" in modes:
                raise ValueError("`sweep_lam`: `pace` none has no lambda")
        elif len(modes) > 1:
            raise ValueError("`pace` takes one objective (a comma-separated list only with `sweep_lam`)")
        if (self.sweep_lam or self.search) and self.data is not None:
            raise ValueError("`search` and `sweep_lam` study the built-in digits experiment: drop `data`")
        if self.sweep_lam and self.search:
            raise ValueError("`search` and `sweep_lam` exclude each other")

    def fingerprint(self) -> Dict[str, Any]:
        """The settings a ``--resume`` must find unchanged to continue the same run."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_FINGERPRINT}


AT_LEAST = dict.fromkeys(
    "epochs batch_size rank eval_every shots pretrain_epochs img_size num_classes lazy_interval "
    "stop_after_epoch threads repeats".split(),
    1,
) | {"copies": 2, "workers": 0}
DATA_ONLY = ("split", "eval_split", "num_classes", "augment", "normalize", "partial_checkpoint")
# Settings that do not change the numbers a run computes (where and how fast it runs, what it
# reports, when it stops), plus the epoch count, which a resume may extend (see the loop).
NOT_IN_FINGERPRINT = frozenset(
    "out resume resume_new_optim overwrite stop_after_epoch eval_every eval_batch_size workers export "
    "threads progress epoch_lines label device repeats epochs search sweep_lam".split()
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
# digits by `pace-train --search --repeats 1` (pace.train.studies); fpa was not searched.
MODE_SIGMA_LAM: Dict[str, Dict[str, Tuple[float, float]]] = {
    "data": dict(none=(0.0, 0.0), pace=(1.2, 1.0), fast=(1.5, 0.5), lazy=(1.2, 2.0), fpa=(0.0, 1.0)),
    "digits": dict(none=(0.0, 0.0), pace=(0.5, 2.0), fast=(1.0, 0.5), lazy=(1.0, 0.5), fpa=(0.0, 1.0)),
}


def build_config(given: Dict[str, Any]) -> RunConfig:
    """The run's settings from the flags that were given (unset flags absent from ``given``)."""
    values = {**(DIGITS_PRESET if given.get("data") is None else {}), **given}
    if values.get("workers") is None:
        values["workers"] = min(4, os.cpu_count() or 1)
    return RunConfig(**values)  # an unknown setting is a TypeError naming it


def for_objective(cfg: RunConfig, mode: str) -> RunConfig:
    """``cfg`` for one objective: its sigma and lam filled in where the user gave none."""
    sigma, lam = MODE_SIGMA_LAM["digits" if cfg.data is None else "data"][mode]
    lam = 0.0 if mode == "none" else (lam if cfg.lam is None else cfg.lam)
    return replace(cfg, pace=mode, sigma=sigma if cfg.sigma is None else cfg.sigma, lam=lam)
