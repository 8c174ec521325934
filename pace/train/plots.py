"""The diagnostics the PACE paper plots (held-out gradient norm, FP-distance and accuracy per
evaluation), the training objective's gradient norm per step, and the lambda sweep of Fig. 4.
Drawn with matplotlib's Agg canvas directly, so no GUI backend or global pyplot state
is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping


def _series(records: List[Dict[str, Any]], kind: str, key: str):
    xs, ys = [], []
    for r in records:
        if r.get("type") == kind and isinstance(r.get(key), (int, float)):
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def plot_runs(runs: Mapping[str, List[Dict[str, Any]]], path: Path, title: str = "") -> Path:
    """One PNG, one line per run, four panels: the paper's Fig. 2 diagnostics on the evaluation set
    (held-out gradient norm, FP-distance, train/val accuracy) and, apart, the training objective's
    gradient norm per step (a different quantity: see :mod:`pace.diagnostics`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_g, ax_fp, ax_acc, ax_train_g = fig.subplots(1, 4)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        label = name if len(runs) > 1 else None
        xs, ys = _series(records, "eval", "val_grad_norm")
        ax_g.plot(xs, ys, "o-", color=color, ms=3, label=label)
        xs, ys = _series(records, "eval", "val_fp_distance")
        ax_fp.plot(xs, ys, "o-", color=color, ms=3, label=label)
        xs, ys = _series(records, "eval", "val_acc")
        ax_acc.plot(
            xs, [100 * y for y in ys], "o-", color=color, ms=3, label=f"{name} val" if label else "val"
        )
        xs, ys = _series(records, "eval", "train_acc")
        ax_acc.plot(
            xs, [100 * y for y in ys], "--", color=color, lw=0.8, label=f"{name} train" if label else "train"
        )
        xs, ys = _series(records, "step", "train_objective_grad_norm")
        ax_train_g.plot(xs, ys, color=color, lw=0.8, label=label)
    ax_g.set(title="gradient norm of the val loss (eval mode)", xlabel="step", yscale="log")
    ax_fp.set(title="FP-distance on val (eval mode)", xlabel="step")
    ax_acc.set(title="accuracy (%)", xlabel="step")
    ax_train_g.set(title="training objective's gradient norm", xlabel="step", yscale="log")
    for ax in (ax_g, ax_fp, ax_acc, ax_train_g):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    if len(runs) > 1:
        ax_g.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from .checkpoint import atomic_write_file

    return atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_lam_sweep(points: Mapping[str, List[tuple]], path: Path, title: str = "") -> Path:
    """The paper's Fig. 4: the held-out gradient norm averaged over training against lambda, one
    line per objective; ``points[name]`` holds ``(lam, mean, low, high)`` (the spread over draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, rows) in enumerate(points.items()):
        lams = [r[0] for r in rows]
        ax.plot(lams, [r[1] for r in rows], "o-", color=f"C{i}", label=name)
        ax.fill_between(lams, [r[2] for r in rows], [r[3] for r in rows], color=f"C{i}", alpha=0.15)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="lambda",
        ylabel="gradient norm of the val loss, mean over evaluations",
        title=title,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    from .checkpoint import atomic_write_file

    return atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
