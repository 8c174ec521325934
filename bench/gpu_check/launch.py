"""``python -m bench.gpu_check launch``: every kernel launched at ragged shapes, to run under
compute-sanitizer, and which Triton kernels of :mod:`pace_kernels` were compiled (so launched)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from .results import DTYPES, write_json


@dataclass(frozen=True)
class LaunchCase:
    op: str  # "lora_add" | "lora_mul"
    samples: int
    tokens: int
    in_features: int
    out_features: int
    rank: int
    noise: str  # "sample" | "token" | "none"
    input_grad: bool


def launch_cases(subset: str) -> list[LaunchCase]:
    """Ragged shapes that reach every launch path: per-sample segments (T = 197) and gathered noise
    rows (T = 1, per-token), input gradient or not (lora_add's one-program-per-row-tile backward),
    few rows (one dM split) and > 2048 rows over a small [D, K] (several dM splits)."""
    cases = []
    for op in ("lora_add", "lora_mul"):
        cases += [
            LaunchCase(op, 2, 197, 203, 301, 10, "sample", True),
            LaunchCase(op, 2, 197, 203, 301, 10, "none", True),
        ]
        if subset == "all":
            cases += [
                LaunchCase(op, 2, 197, 203, 301, 10, "sample", False),
                LaunchCase(op, 5, 1, 203, 301, 18, "token", True),
                LaunchCase(op, 12, 197, 130, 150, 1, "sample", True),
                LaunchCase(op, 3, 45, 77, 93, 64, "sample", True),
            ]
    return cases


def launch_once(case: LaunchCase, dtype: torch.dtype, device: str) -> None:
    import pace_kernels

    gen = torch.Generator().manual_seed(0)
    s, t, k, d, r = case.samples, case.tokens, case.in_features, case.out_features, case.rank

    def rand(*size: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    x = rand(s, t, k, grad=case.input_grad)
    weight, bias = rand(d, k, scale=k**-0.5), rand(d, scale=0.1)
    lora_a, lora_b, db = (
        rand(r, k, scale=k**-0.5, grad=True),
        rand(d, r, scale=0.1, grad=True),
        rand(d, scale=0.1, grad=True),
    )
    noise = None
    if case.noise == "sample":
        noise = (1.0 + 0.5 * torch.randn(s, d, generator=gen)).to(device)
    elif case.noise == "token":
        noise = (1.0 + 0.5 * torch.randn(s, t, d, generator=gen)).to(device)
    fn = pace_kernels.lora_add_linear if case.op == "lora_add" else pace_kernels.lora_mul_linear
    y = fn(x, weight, bias, lora_a, lora_b, db, noise, backend="triton")
    leaves = [v for v in (x, lora_a, lora_b, db) if v.requires_grad]
    torch.autograd.grad(y, leaves, torch.randn_like(y))
    if device == "cuda":
        torch.cuda.synchronize()


def launched_kernels() -> dict[str, int | None]:
    """Every Triton kernel that the host modules (``pace_kernels.lora_*.op``) launch, by name, with how
    many binaries it compiled for the device (None where this Triton keeps no per-device cache, e.g.
    in the interpreter). The host modules, not the kernel modules: these also hold the ``jit_helper``
    functions, which are inlined into kernels and never compiled on their own, so on a GPU they
    would read as kernels never launched."""
    import importlib

    from triton.runtime.autotuner import Autotuner, Heuristics

    counts: dict[str, int | None] = {}

    def visit(obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for value in obj.values():
                visit(value, seen)
            return
        if isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, seen)
            return
        fn = obj
        while isinstance(fn, (Autotuner, Heuristics)):
            fn = fn.fn
        # One kernel sits behind several autotuners (one per config table): count its binaries once.
        if not hasattr(fn, "arg_names") or not hasattr(fn, "fn") or (fn is not obj and id(fn) in seen):
            return
        seen.add(id(fn))
        name = getattr(fn.fn, "__name__", repr(fn))
        caches = getattr(fn, "device_caches", None)
        n = None
        if caches is not None:
            n = sum(len(entry[0]) for entry in list(caches.values()) if entry and isinstance(entry[0], dict))
        previous = counts.get(name)
        counts[name] = n if previous is None else previous + (n or 0)

    seen: set[int] = set()
    for module_name in ("pace_kernels.lora_add.op", "pace_kernels.lora_mul.op"):
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            visit(value, seen)
    return counts


def launch_main(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [DTYPES[name] for name in args.dtypes.split(",") if name]
    t0 = time.perf_counter()
    failures = []
    for dtype in dtypes:
        for case in launch_cases(args.subset):
            label = f"{case} {dtype}"
            try:
                launch_once(case, dtype, device)
                print(f"launched {label}", flush=True)
            except Exception as exc:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"FAILED {failures[-1]}", flush=True)
    kernels = launched_kernels()
    never = sorted(n for n, c in kernels.items() if c == 0)
    print(f"kernels compiled for the device: {json.dumps(kernels, sort_keys=True)}", flush=True)
    if never:
        print(f"kernels never launched by this driver: {', '.join(never)}", flush=True)
    write_json(
        args.json,
        {
            "device": device,
            "subset": args.subset,
            "dtypes": args.dtypes,
            "failures": failures,
            "kernels": kernels,
            "never_launched": never,
            "seconds": time.perf_counter() - t0,
        },
    )
    return 1 if failures else 0
