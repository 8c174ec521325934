"""The pass criterion of ``python -m bench.gpu_check check`` and the records of its results.

The criterion is the kernel tests' (tests/pace_kernels/_cases.py): the kernel's error, relative to
the largest magnitude of the float64 result, may be at most twice the error of the reference run in
the same dtype plus a floor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Allowed error floor, relative to the largest magnitude of the float64 result (the kernel tests').
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64; inf when ``got`` holds a non-finite value."""
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return math.inf
    scale = want64.abs().max().item() if want64.numel() else 0.0
    diff = (got64 - want64).abs().max().item() if want64.numel() else 0.0
    return diff / scale if scale > 0 else diff


def rel_l2_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return math.inf
    norm = want64.norm().item()
    diff = (got64 - want64).norm().item()
    return diff / norm if norm > 0 else diff


def allowed_error(reference_error: float, dtype: torch.dtype, factor: float = 1.0) -> float:
    """The kernel tests' criterion: twice the same-dtype reference's error plus the dtype's floor."""
    return 2.0 * reference_error + factor * FLOOR[dtype]


@dataclass
class TensorResult:
    """One compared tensor (the output or a gradient) of one case."""

    name: str
    fused: float  # max-relative error of the fused path against float64
    reference: float  # the same for the reference run in the case's dtype
    limit: float
    fused_rel_l2: float

    @property
    def ok(self) -> bool:
        return self.fused <= self.limit


def compare(
    name: str,
    fused: torch.Tensor,
    reference: torch.Tensor,
    oracle: torch.Tensor,
    dtype: torch.dtype,
    factor: float = 1.0,
) -> TensorResult:
    ref_err = max_rel_error(reference, oracle)
    return TensorResult(
        name,
        max_rel_error(fused, oracle),
        ref_err,
        allowed_error(ref_err, dtype, factor),
        rel_l2_error(fused, oracle),
    )


@dataclass
class CaseResult:
    group: str
    name: str
    seconds: float = 0.0
    tensors: list[TensorResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.tensors) and all(t.ok for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        for t, obj in zip(self.tensors, out["tensors"]):
            obj["ok"] = t.ok
        return out

    def summary(self) -> str:
        status = "PASS" if self.ok else ("ERROR" if self.error else "FAIL")
        if self.error:
            return f"{status}  {self.name}: {self.error}"
        worst = max(self.tensors, key=lambda t: t.fused / t.limit if t.limit > 0 else math.inf)
        return (
            f"{status}  {self.name}: worst {worst.name} {worst.fused:.2e} (limit {worst.limit:.2e}, "
            f"reference {worst.reference:.2e}) [{self.seconds:.1f}s]"
        )


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` through a temporary file, so a run stopped mid-write leaves the last whole one."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)
