"""The PACE paper's diagnostics per evaluation, the training objective's gradient norm per step and
the lambda sweep of Fig. 4, drawn on matplotlib's Agg canvas (no GUI backend, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping

from .checkpoint import atomic_write_file


def _series(records: List[Dict[str, Any]], kind: str, key: str, scale: float = 1.0):
    xs, ys = [], []
    for r in records:
        if r.get("type") == kind and isinstance(r.get(key), (int, float)):
            xs.append(r["step"])
            ys.append(scale * r[key])
    return xs, ys


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_runs(runs: Mapping[str, List[Dict[str, Any]]], path: Path, title: str = "") -> Path:
    """One PNG, one line per run: the paper's Fig. 2 diagnostics on the evaluation set and, apart, the
    training objective's gradient norm per step (a different quantity: see :mod:`pace.diagnostics`)."""
    fig = _figure((19, 4.2))
    ax_g, ax_fp, ax_acc, ax_train_g = fig.subplots(1, 4)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        label = name if len(runs) > 1 else None
        ax_g.plot(*_series(records, "eval", "val_grad_norm"), "o-", color=color, ms=3, label=label)
        ax_fp.plot(*_series(records, "eval", "val_fp_distance"), "o-", color=color, ms=3, label=label)
        val, train = (f"{name} val", f"{name} train") if label else ("val", "train")
        ax_acc.plot(*_series(records, "eval", "val_acc", 100), "o-", color=color, ms=3, label=val)
        ax_acc.plot(*_series(records, "eval", "train_acc", 100), "--", color=color, lw=0.8, label=train)
        ax_train_g.plot(
            *_series(records, "step", "train_objective_grad_norm"), color=color, lw=0.8, label=label
        )
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
    return _save(fig, path)


def plot_lam_sweep(points: Mapping[str, List[tuple]], path: Path, title: str = "") -> Path:
    """The paper's Fig. 4: the held-out gradient norm averaged over training against lambda, one
    line per objective; ``points[name]`` holds ``(lam, mean, low, high)`` (the spread over draws)."""
    ax = _figure((6.5, 4.5)).subplots()
    for i, (name, rows) in enumerate(points.items()):
        lams = [r[0] for r in rows]
        ax.plot(lams, [r[1] for r in rows], "o-", color=f"C{i}", label=name)
        ax.fill_between(lams, [r[2] for r in rows], [r[3] for r in rows], color=f"C{i}", alpha=0.15)
    ylabel = "gradient norm of the val loss, mean over evaluations"
    ax.set(xscale="log", yscale="log", xlabel="lambda", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(ax.figure, path)
