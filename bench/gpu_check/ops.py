"""The op cases of ``python -m bench.gpu_check check``: each fused op against the reference and float64.

``lora_add`` and ``lora_mul`` through ``pace_kernels.lora_*_linear``; ``rlrr`` and
``lora_mul_vpt_add`` through :class:`pace.PaceLinear`. ``pace`` and ``pace_kernels`` are imported
inside the runners: the package sets ``TRITON_INTERPRET`` before the first import of triton.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .results import DTYPES, CaseResult, compare


@dataclass(frozen=True)
class OpCase:
    """One fused op at one shape: ``samples x tokens`` rows of ``in_features -> out_features``."""

    op: str  # "lora_add" | "lora_mul" | "rlrr" | "lora_mul_vpt_add" (the last two through PaceLinear)
    shape: str
    samples: int
    tokens: int
    in_features: int
    out_features: int
    rank: int
    noise: str  # "sample" | "none"
    dtype: str

    @property
    def name(self) -> str:
        rows = self.samples * self.tokens
        return (
            f"{self.op} r{self.rank} {self.noise} {self.shape} "
            f"{rows}x{self.in_features}->{self.out_features} {self.dtype}"
        )


_VIT_ROWS = (2 * 64, 197)  # PACE's two copies of a batch of 64 ViT-B/16 images
FULL_SHAPES = (
    ("vitb-qkv", *_VIT_ROWS, 768, 2304),
    ("vitb-proj", *_VIT_ROWS, 768, 768),
    ("vitb-fc1", *_VIT_ROWS, 768, 3072),
    ("vitb-fc2", *_VIT_ROWS, 3072, 768),
    ("llm-4096", 2, 2048, 4096, 4096),
    ("llm-ragged", 2, 2047, 4091, 4101),
)
RAGGED_SHAPE = ("ragged", 3, 197, 203, 301)
SMALL_SHAPES = (("tiny", 2, 5, 24, 40), ("tiny-t1", 3, 1, 17, 20))
OPS = ("lora_add", "lora_mul", "pacelinear")


def op_cases(group_op: str, dtype: str, size: str) -> list[OpCase]:
    """The cases of one group: ``group_op`` is ``lora_add``, ``lora_mul`` or ``pacelinear``."""
    if size == "full":
        shapes = FULL_SHAPES if dtype != "fp32" else (FULL_SHAPES[0],)
        ragged_ranks = (1, 18, 64)
    else:
        shapes, ragged_ranks = SMALL_SHAPES, (1, 18)
    cases: list[OpCase] = []

    def add(op: str, shape: tuple, rank: int, noise: str) -> None:
        cases.append(OpCase(op, shape[0], *shape[1:], rank, noise, dtype))

    rank_by_op = {"lora_add": 8, "lora_mul": 10, "lora_mul_vpt_add": 10, "rlrr": 1}
    for shape in shapes:
        if group_op == "pacelinear":
            add("lora_mul_vpt_add", shape, rank_by_op["lora_mul_vpt_add"], "sample")
            add("rlrr", shape, 1, "sample")
        else:
            add(group_op, shape, rank_by_op[group_op], "sample")
            add(group_op, shape, rank_by_op[group_op], "none")
    if group_op != "pacelinear" and size == "full":
        for rank in ragged_ranks:
            add(group_op, RAGGED_SHAPE, rank, "sample")
        add(group_op, RAGGED_SHAPE, 18, "none")
    elif group_op != "pacelinear":
        for rank in ragged_ranks:
            add(group_op, shapes[0], rank, "sample")
    return cases


def _generator(name: str, device: str) -> torch.Generator:
    """A generator on ``device`` (drawing ViT-sized inputs on the CPU would take seconds per case),
    seeded from the case's name."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))


def _randn(gen: torch.Generator, *size: int, scale: float = 1.0, device: str) -> torch.Tensor:
    return torch.randn(*size, generator=gen, dtype=torch.float64, device=device) * scale


def _grads(y: torch.Tensor, leaves: Sequence[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, leaves, grad_out.to(y.dtype)))


def run_functional_case(case: OpCase, device: str) -> CaseResult:
    """``pace_kernels.lora_*_linear`` with ``backend="triton"`` vs ``"torch"`` vs float64."""
    import pace_kernels

    dtype = DTYPES[case.dtype]
    gen = _generator(case.name, device)
    s, t, k, d, r = case.samples, case.tokens, case.in_features, case.out_features, case.rank
    # Factor scales that make the adapter term as large as the frozen one (lora_mul: M ~ 0.5).
    master = {
        "x": _randn(gen, s, t, k, device=device),
        "weight": _randn(gen, d, k, scale=k**-0.5, device=device),
        "bias": _randn(gen, d, scale=0.1, device=device),
        "lora_a": _randn(gen, r, k, scale=(k**-0.5 if case.op == "lora_add" else r**-0.5), device=device),
        "lora_b": _randn(gen, d, r, scale=0.5, device=device),
        "delta_bias": _randn(gen, d, scale=0.1, device=device),
    }
    noise = None
    if case.noise == "sample":  # drawn in fp32 as PaceLinear draws it
        noise = 1.0 + 0.5 * torch.randn(s, d, generator=gen, device=device)
    grad_out = _randn(gen, s, t, d, device=device)
    fn = pace_kernels.lora_add_linear if case.op == "lora_add" else pace_kernels.lora_mul_linear
    trainable = ("x", "lora_a", "lora_b", "delta_bias")

    def run(backend: str, run_dtype: torch.dtype) -> list[torch.Tensor]:
        args = {n: v.to(run_dtype).requires_grad_(n in trainable) for n, v in master.items()}
        z = None if noise is None else (noise.double() if run_dtype == torch.float64 else noise)
        y = fn(
            args["x"],
            args["weight"],
            args["bias"],
            args["lora_a"],
            args["lora_b"],
            args["delta_bias"],
            z,
            backend=backend,
        )
        return [y.detach(), *_grads(y, [args[n] for n in trainable], grad_out)]

    oracle = run("torch", torch.float64)
    reference = run("torch", dtype)
    fused = run("triton", dtype)
    names = ("out", *("d" + n for n in trainable))
    result = CaseResult(f"{case.op}-{case.dtype}", case.name)
    result.tensors = [compare(n, f, ref, o, dtype) for n, f, ref, o in zip(names, fused, reference, oracle)]
    return result


def randomise_adapter(layer: torch.nn.Module, gen: torch.Generator) -> None:
    """Nonzero adapter tensors (PACE's init has B = 0 and P_d = 0, which would hide their paths)."""
    with torch.no_grad():
        for p in layer.parameters():
            if not p.requires_grad:
                continue
            scale = 0.5 if p.ndim < 2 else 0.5 / math.sqrt(min(p.shape))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64, device=gen.device).to(p) * scale)


def run_pacelinear_case(case: OpCase, device: str) -> CaseResult:
    """:class:`pace.PaceLinear` (``rlrr`` or ``lora_mul_vpt_add``, sigma 0.5, train mode) with the
    fused kernels vs the reference, the noise drawn from the same seed."""
    import pace

    dtype = DTYPES[case.dtype]
    gen = _generator(case.name, device)
    s, t, k, d = case.samples, case.tokens, case.in_features, case.out_features
    # PaceLinear draws its frozen weight from the global RNG, which torch seeds afresh per process.
    torch.manual_seed(zlib.crc32(case.name.encode()))
    base = pace.PaceLinear(
        k, d, adapter=case.op, rank=case.rank, sigma=0.5, backend="torch", device=device, dtype=torch.float64
    )
    randomise_adapter(base, gen)
    base.train()
    x64 = _randn(gen, s, t, k, device=device)
    grad_out = _randn(gen, s, t, d, device=device)

    def run(backend: str, run_dtype: torch.dtype) -> list[torch.Tensor]:
        layer = copy.deepcopy(base).to(run_dtype)
        layer.backend = backend
        x = x64.to(run_dtype).requires_grad_(True)
        params = layer.adapter_parameters()
        torch.manual_seed(1234)  # the same noise for every run
        y = layer(x)
        return [y.detach(), *_grads(y, [x, *params.values()], grad_out)]

    names = ["out", "dx", *("d" + n for n in base.adapter_parameters())]
    oracle = run("torch", torch.float64)
    reference = run("torch", dtype)
    fused = run("triton", dtype)
    result = CaseResult(f"pacelinear-{case.dtype}", case.name)
    result.tensors = [compare(n, f, ref, o, dtype) for n, f, ref, o in zip(names, fused, reference, oracle)]
    return result
