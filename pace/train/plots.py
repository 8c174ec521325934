"""The diagnostics the PACE paper plots: gradient norm per step, FP-distance and accuracy per
evaluation. Drawn with matplotlib's Agg canvas directly, so no GUI backend or global pyplot state
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
    """One PNG with three panels (gradient norm, FP-distance, train/val accuracy); one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_g, ax_fp, ax_acc = fig.subplots(1, 3)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        label = name if len(runs) > 1 else None
        xs, ys = _series(records, "step", "grad_norm")
        ax_g.plot(xs, ys, color=color, lw=0.8, label=label)
        xs, ys = _series(records, "eval", "fp_distance")
        ax_fp.plot(xs, ys, "o-", color=color, ms=3, label=label)
        xs, ys = _series(records, "eval", "val_acc")
        ax_acc.plot(
            xs, [100 * y for y in ys], "o-", color=color, ms=3, label=f"{name} val" if label else "val"
        )
        xs, ys = _series(records, "eval", "train_acc")
        ax_acc.plot(
            xs, [100 * y for y in ys], "--", color=color, lw=0.8, label=f"{name} train" if label else "train"
        )
    ax_g.set(title="gradient norm (trainable tensors)", xlabel="step", yscale="log")
    ax_fp.set(title="FP-distance (held-out batch, eval mode)", xlabel="step")
    ax_acc.set(title="accuracy (%)", xlabel="step")
    for ax in (ax_g, ax_fp, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    if len(runs) > 1:
        ax_g.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from .checkpoint import atomic_write_file

    return atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
