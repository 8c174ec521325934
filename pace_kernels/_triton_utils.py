"""Pieces every Triton kernel module shares: interpreter detection and the compile-check registry.

Each kernel module (``lora_add``, ``lora_mul``) exposes ``compile_specs() -> list[CompileSpec]``:
one entry per kernel and shipped config, which ``python -m pace_kernels.compile_check`` compiles
for a GPU target without a GPU (SPEC section 7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel in one config, as ``triton.compile(ASTSource(...))`` needs it.

    ``signature`` maps every non-constexpr argument name to its Triton type string (``"*bf16"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` maps the constexpr argument names to their values.
    ``dtype`` is the operand dtype the row stands for (fp16/bf16 rows must use wgmma).
    """

    name: str
    fn: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    dtype: torch.dtype
    note: str = field(default="")


TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
