"""metrics.jsonl (one JSON record per line, rank 0, resumed by length), peak memory, and the figures."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..io import atomic_write

# Keys whose values depend on the machine's speed, not on the computation: left out when two runs
# are compared for equality (resume, determinism).
TIMING_KEYS = ("seconds", "img_per_s", "peak_mem_mb", "time")


class MetricsLog:
    """Append-only JSON-lines log; ``path`` None (ranks other than 0) writes nothing."""

    def __init__(self, path: Optional[Path], resume_at_bytes: Optional[int] = None) -> None:
        self.path, self._file, self.missing_bytes = path, None, 0
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at_bytes is not None:
            size = path.stat().st_size if path.exists() else 0
            self.missing_bytes = max(0, resume_at_bytes - size)
            if size > resume_at_bytes:
                os.truncate(path, resume_at_bytes)
        self._file = open(path, "w" if resume_at_bytes is None else "a")

    @property
    def bytes(self) -> int:
        return 0 if self._file is None else self._file.tell()

    def write(self, record: Dict[str, Any]) -> None:
        if self._file is not None:  # JSON has no NaN/inf: they go in as strings, so the file stays JSON
            clean = {
                k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
            }
            self._file.write(json.dumps(clean, sort_keys=True) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The records of a metrics file; a torn last line (a run killed mid-write) is skipped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON record") from None
    return records


def without_timing(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset the allocator's peak. CPU: reset the process's peak RSS (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak bytes allocated by torch. CPU: the process's peak resident set size (RSS), which
    includes Python and the libraries (a few hundred MB before any tensor)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _series(records: List[Dict[str, Any]], kind: str, key: str, scale: float = 1.0):
    points = [r for r in records if r.get("type") == kind and isinstance(r.get(key), (int, float))]
    return [r["step"] for r in points], [scale * r[key] for r in points]


def _figure(size):  # Agg canvas: no GUI backend, no pyplot state
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_runs(runs: Mapping[str, List[Dict[str, Any]]], path: Path, title: str = "") -> Path:
    """One PNG, one line per run: the paper's Fig. 2 diagnostics on the evaluation set and, apart, the
    training objective's gradient norm per step (a different quantity: see :mod:`pace.diagnostics`)."""
    fig = _figure((19, 4.2))
    ax_g, ax_fp, ax_acc, ax_train_g = fig.subplots(1, 4)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        label = name if len(runs) > 1 else None
        for ax, key in ((ax_g, "val_grad_norm"), (ax_fp, "val_fp_distance")):
            ax.plot(*_series(records, "eval", key), "o-", color=color, ms=3, label=label)
        val, train = (f"{name} val", f"{name} train") if label else ("val", "train")
        ax_acc.plot(*_series(records, "eval", "val_acc", 100), "o-", color=color, ms=3, label=val)
        ax_acc.plot(*_series(records, "eval", "train_acc", 100), "--", color=color, lw=0.8, label=train)
        train_gnorm = _series(records, "step", "train_objective_grad_norm")
        ax_train_g.plot(*train_gnorm, color=color, lw=0.8, label=label)
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
