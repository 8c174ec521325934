"""What the benchmarks run: shapes, ops, dtypes, the full/reduced rule, and GEMM-equivalent counts.

Kept free of pytest so :mod:`bench.report` and the tests can import it cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FULL_ENV = "PACE_BENCH_FULL"


@dataclass(frozen=True)
class Shape:
    """One linear layer: ``samples x tokens`` rows of ``in_features`` -> ``out_features``."""

    name: str
    samples: int
    tokens: int
    in_features: int
    out_features: int

    @property
    def n_rows(self) -> int:
        return self.samples * self.tokens

    def label(self) -> str:
        return f"{self.name} {self.n_rows}x{self.in_features}->{self.out_features}"


@dataclass(frozen=True)
class Op:
    """A fused op as benchmarked: which kernel, its rank, and whether per-sample noise is applied."""

    kind: str  # "lora_add" | "lora_mul"
    rank: int
    noise: str  # "sample" | "none"

    @property
    def name(self) -> str:
        return f"{self.kind}-r{self.rank}-{'noisy' if self.noise != 'none' else 'clean'}"


# ViT-B/16 at batch 64 run as PACE's two copies: 2 x 64 samples of 197 tokens.
_VIT_SAMPLES, _VIT_TOKENS = 2 * 64, 197
FULL_SHAPES: tuple[Shape, ...] = (
    Shape("vitb-qkv", _VIT_SAMPLES, _VIT_TOKENS, 768, 2304),
    Shape("vitb-proj", _VIT_SAMPLES, _VIT_TOKENS, 768, 768),
    Shape("vitb-fc1", _VIT_SAMPLES, _VIT_TOKENS, 768, 3072),
    Shape("vitb-fc2", _VIT_SAMPLES, _VIT_TOKENS, 3072, 768),
    Shape("vitl-fc1", _VIT_SAMPLES, _VIT_TOKENS, 1024, 4096),
    Shape("llm-4096", 4, 2048, 4096, 4096),
    Shape("llm-11008", 4, 2048, 4096, 11008),
)

# CPU reduced set: one square and one wide ViT-B layer with 2 samples of 197 tokens (T = 197 keeps the
# per-sample noise layout of the real shapes), fp32 only.
REDUCED_SHAPES: tuple[Shape, ...] = (
    Shape("vitb-proj", 2, _VIT_TOKENS, 768, 768),
    Shape("vitb-fc1", 2, _VIT_TOKENS, 768, 3072),
)

OPS: tuple[Op, ...] = (
    Op("lora_add", 8, "sample"),
    Op("lora_mul", 10, "sample"),
    Op("lora_mul", 10, "none"),
)

PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")

CONTENDERS: tuple[str, ...] = ("floor", "reference", "compiled", "peft", "fused")

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def full_set() -> bool:
    """The rule: ``PACE_BENCH_FULL=1`` full, ``=0`` reduced, unset: full exactly when CUDA is available."""
    value = os.environ.get(FULL_ENV, "").strip()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    if value:
        raise ValueError(f"{FULL_ENV} must be 0 or 1, got {value!r}")
    return torch.cuda.is_available()


def shapes() -> tuple[Shape, ...]:
    return FULL_SHAPES if full_set() else REDUCED_SHAPES


def dtypes() -> list[torch.dtype]:
    """bf16 on GPU; on CPU fp32 (the reduced set) or bf16 and fp32 (the full set)."""
    if device() == "cuda":
        return [torch.bfloat16]
    return [torch.bfloat16, torch.float32] if full_set() else [torch.float32]


def linear_gemm_equiv(pass_: str) -> float:
    """GEMM-equivalents of the frozen ``nn.Linear`` that the floor contender times: fwd 1, fwd + dX 2."""
    return 1.0 if pass_ == "fwd" else 2.0


def gemm_equiv(op: Op, shape: Shape, pass_: str) -> float:
    """The floor of docs/design.md section 3, in units of one ``N x K x D`` GEMM.

    lora_add: fwd ``1 + r(1/D + 1/K)`` (U = X A^T, U B^T), fwd+bwd ``2 + 3r(1/D + 1/K)`` (adds
    Gz B, (Gz B) A, dB, dA). lora_mul: 1 (fwd) and 3 (fwd+bwd), noisy or not: the noisy layer reaches
    the noise-free cost with per-sample weights; :func:`two_gemm_equiv` gives the two-GEMM count.
    """
    k, d, r = shape.in_features, shape.out_features, op.rank
    if op.kind == "lora_add":
        low_rank = r * (1.0 / d + 1.0 / k)
        return 1.0 + low_rank if pass_ == "fwd" else 2.0 + 3.0 * low_rank
    if op.kind == "lora_mul":
        return 1.0 if pass_ == "fwd" else 3.0
    raise ValueError(f"unknown op kind {op.kind!r}")


def two_gemm_equiv(op: Op, shape: Shape, pass_: str) -> float | None:
    """Noisy lora_mul written as two GEMMs per pass (docs/design.md section 3): fwd 2, fwd+bwd 5;
    else None."""
    if op.kind == "lora_mul" and op.noise != "none":
        return 2.0 if pass_ == "fwd" else 5.0
    return None


def flops_per_gemm(shape: Shape) -> float:
    return 2.0 * shape.n_rows * shape.in_features * shape.out_features


def group_name(shape: Shape, op: Op, pass_: str, dtype: torch.dtype) -> str:
    """The pytest-benchmark group: contenders of one (shape, op, noise, pass, dtype) sit together."""
    return (
        f"layer | {shape.label()} | {op.kind} r{op.rank} | noise={op.noise} | {pass_} | {DTYPE_NAMES[dtype]}"
    )
