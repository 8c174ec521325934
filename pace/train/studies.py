"""The digits table (paired differences, t intervals) and its studies: ``--search``, ``--sweep-lam``."""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .checkpoint import atomic_write_text
from .config import RunConfig, for_objective
from .loop import RunResult, log
from .metrics import plot_lam_sweep

TABLE_NOTES = (
    "test acc: the test digits, scored once after training; diff: test acc minus the baseline's on the "
    "same draw, mean +- t(0.975, n-1) * sd / sqrt(n);\n"
    "val gnorm: norm of the gradient of the mean cross-entropy over the validation digits w.r.t. the "
    "trainable tensors (eval mode, no noise; the PACE paper's gradient norm), last evaluation; "
    "val gnorm avg: its mean over the evaluations;\n"
    "train-obj gnorm: the training objective's gradient norm (with PACE's noise and consistency term), "
    "mean over the last epoch's steps; val FP-dist: paper Eq. 5 on the validation digits; "
    "seconds: all draws; memory: the process's peak"
)


@dataclass
class MethodRuns:
    """One row of the table: a method's runs over the draws of the shots."""

    name: str
    runs: List[RunResult]

    def values(self, key: str) -> List[float]:
        return [getattr(r, key) for r in self.runs]

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values(key))

    def std(self, key: str) -> float:
        return statistics.stdev(self.values(key)) if len(self.runs) > 1 else 0.0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    """Mean and half-width ``t(1 - (1 - confidence) / 2, n - 1) * sd / sqrt(n)`` (NaN for n < 2)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    from scipy.stats import t

    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(half)


def paired_differences(rows: List[MethodRuns], key: str = "test_acc") -> Dict[str, List[float]]:
    """Per method, ``key`` minus the first row's (the baseline) draw by draw."""
    base = rows[0].values(key)
    return {row.name: [a - b for a, b in zip(row.values(key), base)] for row in rows[1:]}


def paired_summary(rows: List[MethodRuns]) -> Dict[str, Dict[str, Any]]:
    """Per method the per-draw test-accuracy differences to the baseline, their mean and 95% t half-width."""
    out = {}
    for name, diffs in paired_differences(rows).items():
        mean, half = t_interval(diffs)
        out[name] = {"test_acc_diff_per_draw": diffs, "mean": mean, "ci95_half_width": half}
    return out


def format_table(rows: List[MethodRuns], device: torch.device) -> str:
    mem = "peak MB (GPU)" if device.type == "cuda" else "peak RSS MB"
    n = len(rows[0].runs)
    head = (
        f"{'method':<10} {'test acc % (mean+-sd)':>21} {'diff (mean+-95% CI)':>19} {'val acc %':>9} "
        f"{'val gnorm':>9} {'val gnorm avg':>13} {'train-obj gnorm':>15} {'val FP-dist':>11} {'seconds':>7} "
        f"{mem:>11}"
    )
    lines = [head, "-" * len(head)]
    diffs = paired_differences(rows)
    for row in rows:
        acc = f"{100 * row.mean('test_acc'):.2f}" + (f" +- {100 * row.std('test_acc'):.2f}" if n > 1 else "")
        if row.name in diffs:
            mean, half = t_interval(diffs[row.name])
            diff = f"{100 * mean:+.2f}" + (f" +- {100 * half:.2f}" if n > 1 else "")
        else:
            diff = "-"
        lines.append(
            f"{row.name:<10} {acc:>21} {diff:>19} {100 * row.mean('val_acc'):>9.2f} "
            f"{row.mean('val_grad_norm'):>9.4f} {row.mean('val_grad_norm_mean'):>13.4f} "
            f"{row.mean('train_objective_grad_norm'):>15.4f} {row.mean('val_fp_distance'):>11.3f} "
            f"{sum(r.seconds for r in row.runs):>7.1f} {max(r.peak_mem_mb for r in row.runs):>11.0f}"
        )
    if n > 1:
        lines.append("test acc % per draw / diff vs baseline per draw (points):")
        for row in rows:
            per_draw = " ".join(f"{100 * v:.1f}" for v in row.values("test_acc"))
            diff = " ".join(f"{100 * d:+.1f}" for d in diffs.get(row.name, []))
            lines.append(f"  {row.name:<10} {per_draw}" + (f"  /  {diff}" if diff else ""))
    return "\n".join(lines)


SEARCH_LRS = (3e-3, 1e-2, 3e-2)
SEARCH_SIGMAS = (0.5, 1.0)
SEARCH_LAMS = (0.5, 2.0)
SEARCH_MODES = (("PACE", "pace"), ("PACE_fast", "fast"), ("PACE_lazy", "lazy"))
SEARCH_SEED_OFFSET = 1000  # the search's draws of the shots are not the table's


def run_search(cfg: RunConfig, env, device) -> int:
    """The search behind the digits defaults: the baseline's learning rate, then per objective sigma x lam
    at that rate, each candidate scored by its validation accuracy averaged over ``repeats`` draws."""
    from .default import DigitsExperiment

    seeds = [cfg.seed + SEARCH_SEED_OFFSET + k for k in range(cfg.repeats)]
    study = DigitsExperiment(cfg, env, device, seeds)
    digits = study.digits()
    tried: List[Dict[str, Any]] = []

    def score(name: str, mode: str, **settings) -> float:
        tag = "-".join(f"{k}{v:g}" for k, v in settings.items())
        runs = study.study(digits, f"search/{tag}", name, mode, **settings)
        val_acc = statistics.fmean(r.val_acc for r in runs)
        gnorm = statistics.fmean(r.val_grad_norm_mean for r in runs)
        tried.append({"method": name, **settings, "val_acc": val_acc, "val_grad_norm_mean": gnorm})
        log(f"[search] {name} {tag}: val acc {100 * val_acc:.2f}%", env.is_main)
        return val_acc

    lr = max(SEARCH_LRS, key=lambda v: score("baseline", "none", lr=v))
    chosen: Dict[str, Any] = {"lr": lr}
    for name, mode in SEARCH_MODES:
        grid = [(s, lam) for s in SEARCH_SIGMAS for lam in SEARCH_LAMS]
        sigma, lam = max(grid, key=lambda sl: score(name, mode, lr=lr, sigma=sl[0], lam=sl[1]))
        chosen[mode] = {"sigma": sigma, "lam": lam}
    if env.is_main:
        head = f"search on the validation digits, draws {seeds}, batch {cfg.batch_size}, {cfg.epochs} epochs:"
        lines = [head]
        for t in tried:
            shown = " ".join(f"{k} {t[k]:g}" for k in ("lr", "sigma", "lam") if k in t)
            lines.append(f"{t['method']:<10} {shown}: val acc {100 * t['val_acc']:.2f}%")
        print("\n".join([*lines, f"chosen: {json.dumps(chosen)}"]), flush=True)
        record = {"seeds": seeds, "tried": tried, "chosen": chosen}
        atomic_write_text(study.out / "search.json", json.dumps(record, indent=2) + "\n")
    return 0


def run_lam_sweep(cfg: RunConfig, lams: Sequence[float], modes: Sequence[str], env, device) -> int:
    """The paper's Fig. 4: per objective and lambda, ``val_grad_norm_mean`` (mean and range over
    ``repeats`` draws), written to ``sweep_lam.json`` and ``sweep_lam.png``."""
    from .default import TABLE_NAMES, DigitsExperiment

    seeds = [cfg.seed + k for k in range(cfg.repeats)]
    study = DigitsExperiment(cfg, env, device, seeds)
    digits = study.digits()
    points: Dict[str, List[tuple]] = {}
    records: List[Dict[str, Any]] = []
    for mode, lam in ((mode, lam) for mode in modes for lam in lams):
        name = TABLE_NAMES.get(mode, mode)
        runs = study.study(digits, f"sweep-lam/lam{lam:g}", name, mode, pace=mode, lam=lam)
        norms = [r.val_grad_norm_mean for r in runs]
        points.setdefault(name, []).append((lam, statistics.fmean(norms), min(norms), max(norms)))
        sigma = for_objective(replace(cfg, pace=mode, lam=lam), mode).sigma
        per_draw = dict(val_grad_norm_mean_per_draw=norms, val_acc_per_draw=[r.val_acc for r in runs])
        records.append(dict(method=name, lam=lam, sigma=sigma, **per_draw))
        log(f"[sweep] {name} lam {lam:g}: val grad norm (avg over training) {statistics.fmean(norms):.4g}")
    if env.is_main:
        for r in records:
            gnorm, acc = (statistics.fmean(r[k]) for k in ("val_grad_norm_mean_per_draw", "val_acc_per_draw"))
            print(f"{r['method']:<10} lam {r['lam']:<8g} val gnorm avg {gnorm:.4f}  val acc {100 * acc:.2f}%")
        sys.stdout.flush()
        sweep = json.dumps({"seeds": seeds, "points": records}, indent=2) + "\n"
        atomic_write_text(study.out / "sweep_lam.json", sweep)
        title = f"digits 5-9, {cfg.shots} shots/class, {len(seeds)} draw(s)"
        plot_lam_sweep(points, study.out / "sweep_lam.png", title=title)
    return 0
