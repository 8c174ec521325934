"""metrics.jsonl (one JSON record per line, rank 0 only) and peak-memory readings."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

# Keys whose values depend on the machine's speed, not on the computation: left out when two runs
# are compared for equality (resume, determinism).
TIMING_KEYS = ("seconds", "img_per_s", "peak_mem_mb", "time")


class MetricsLog:
    """Append-only JSON-lines log that can be cut back to a checkpoint's line count on resume."""

    def __init__(self, path: Optional[Path], keep_lines: Optional[int] = None) -> None:
        self.path = path
        self.lines = 0
        self._file = None
        if path is None:
            return
        kept: List[str] = []
        if keep_lines is not None and path.exists():
            kept = path.read_text().splitlines()[:keep_lines]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w")
        for line in kept:
            self._file.write(line + "\n")
        self.lines = len(kept)
        self._file.flush()

    def write(self, record: Dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(_clean(record), sort_keys=True) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _clean(record: Dict[str, Any]) -> Dict[str, Any]:
    # JSON has no NaN/inf; write them as strings so the file stays valid JSON.
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def without_timing(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ------------------------------------------------------------------------------------------ memory
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
