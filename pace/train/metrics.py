"""metrics.jsonl (one JSON record per line, rank 0 only; resumed by length, docs/design.md section 11)
and peak-memory readings."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

# Keys whose values depend on the machine's speed, not on the computation: left out when two runs
# are compared for equality (resume, determinism).
TIMING_KEYS = ("seconds", "img_per_s", "peak_mem_mb", "time")


class MetricsLog:
    """Append-only JSON-lines log; ``path`` None (ranks other than 0) writes nothing."""

    def __init__(self, path: Optional[Path], resume_at_bytes: Optional[int] = None) -> None:
        self.path = path
        self._file = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.missing_bytes = 0
        if resume_at_bytes is None:
            self._file = open(path, "w")
            return
        size = path.stat().st_size if path.exists() else 0
        self.missing_bytes = max(0, resume_at_bytes - size)
        if size > resume_at_bytes:
            os.truncate(path, resume_at_bytes)
        self._file = open(path, "a")

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
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak bytes allocated by torch. CPU: the process's peak resident set size (RSS), which
    includes Python and the libraries (a few hundred MB before any tensor)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
