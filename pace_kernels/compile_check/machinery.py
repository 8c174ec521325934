"""Compile a kernel config for a GPU target without a GPU and read what ``ptxas -v`` says
(docs/design.md section 7): the machinery :mod:`pace_kernels.compile_check` runs over the specs of
:mod:`.lora_add_specs` and :mod:`.lora_mul_specs`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._triton_utils import MAX_SHARED_BYTES, is_interpreting

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


@dataclass(frozen=True)
class CompileSpec:
    """One kernel in one config, as ``triton.compile(ASTSource(...))`` needs it.

    ``signature`` maps every non-constexpr argument name to its Triton type string (``"*bf16"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` maps the constexpr argument names to their values
    (an argument the runtime specialises, such as a stride equal to 1, may be listed here too).
    ``dtype`` is the operand dtype the row stands for (fp16/bf16 rows must use tensor cores).
    ``divisible`` names the integer arguments the real launches see as multiples of 16 (the
    runtime specialises on that, and it changes vectorisation); pointer arguments are always
    taken as 16-byte aligned, as every torch allocation is.
    """

    name: str
    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    dtype: torch.dtype
    note: str = field(default="")
    divisible: tuple[str, ...] = field(default=())


TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


DOT_VARIANTS: tuple[tuple[torch.dtype, str], ...] = (
    (torch.bfloat16, "tf32"),
    (torch.float16, "tf32"),
    (torch.float32, "tf32x3"),
    (torch.float32, "tf32"),
)
"""Every ``(operand dtype, PRECISION)`` pair ``pace_kernels._triton_utils.dot_flags`` can give: the
rows a compile check needs."""


def tensor_core_instruction(arch: int) -> str:
    """The PTX instruction a 16-bit dot must compile to on ``sm_<arch>``: Hopper's ``wgmma``; the
    warp-level ``mma.sync.aligned`` on Ampere and Ada (wgmma exists only on sm_90)."""
    return "wgmma" if arch >= 90 else "mma.sync.aligned"


@dataclass(frozen=True)
class CompileReport:
    """What compiling one :class:`CompileSpec` for a CUDA arch gave. ``tensor_cores``: the PTX has
    the arch's tensor-core instruction (:func:`tensor_core_instruction`)."""

    spec: CompileSpec
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared_bytes: int = -1
    tensor_cores: bool = False
    error: str = ""
    arch: int = 90

    @property
    def spill_bytes(self) -> int:
        return max(self.spill_stores, 0) + max(self.spill_loads, 0)

    @property
    def needs_tensor_cores(self) -> bool:
        return self.spec.dtype in (torch.float16, torch.bfloat16)

    @property
    def shared_over_limit(self) -> bool:
        limit = MAX_SHARED_BYTES.get(self.arch)
        return limit is not None and self.shared_bytes > limit

    @property
    def problems(self) -> list[str]:
        """Why the config may not ship for this arch (empty when it may)."""
        if self.error:
            return [self.error]
        why = []
        if self.spill_bytes:
            why.append("spills")
        if self.needs_tensor_cores and not self.tensor_cores:
            why.append(f"no {tensor_core_instruction(self.arch)}")
        if self.shared_over_limit:
            why.append(f"shared memory over the sm_{self.arch} limit ({MAX_SHARED_BYTES[self.arch]} B)")
        return why

    @property
    def ok(self) -> bool:
        return not self.problems


def ptxas_path() -> str:
    """The ptxas bundled with triton (``TRITON_PTXAS_PATH`` overrides)."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    if triton is None:
        raise RuntimeError("triton is not installed")
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v`` output (one kernel)."""
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        raise ValueError(f"could not parse ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def _raw_jit_function(fn: Any) -> Any:
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn


def compile_for_arch(spec: CompileSpec, arch: int = 90) -> CompileReport:
    """Compile ``spec`` for ``sm_<arch>`` (no GPU needed) and report registers, spills, shared
    memory and whether the PTX uses the arch's tensor cores. Needs the real compiler: not under the
    interpreter."""
    if is_interpreting():
        raise RuntimeError("compile_for_arch needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _raw_jit_function(spec.fn)
    try:
        signature = {}
        for name in fn.arg_names:
            if name in spec.constexprs:
                signature[name] = "constexpr"
            elif name in spec.signature:
                signature[name] = spec.signature[name]
            else:
                raise KeyError(f"{spec.name}: argument {name!r} is in neither signature nor constexprs")
        attrs = {}
        for i, name in enumerate(fn.arg_names):
            ty = signature[name]
            if ty.startswith("*") or name in spec.divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
        arch_name = f"{arch}a" if arch >= 90 else str(arch)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages),
        )
        ptx = kernel.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            out = subprocess.run(
                [ptxas_path(), "-v", f"--gpu-name=sm_{arch_name}", path, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True, text=True, check=True,
            )
        regs, st, ld = parse_ptxas(out.stdout + out.stderr)
        return CompileReport(spec, regs, st, ld, int(kernel.metadata.shared),
                             tensor_core_instruction(arch) in ptx, arch=arch)
    except Exception as exc:  # reported as a failed row, not a crash of the whole check
        return CompileReport(spec, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200], arch=arch)


def config_label(constexprs: dict[str, Any], keys: Sequence[str], num_warps: int, num_stages: int) -> str:
    """Short label for a config row, e.g. ``BM128 BN128 BK64 w8 s3``."""
    parts = []
    for k in keys:
        short = k.replace("BLOCK_", "B")
        parts.append(f"{short}{constexprs[k]}")
    return " ".join(parts + [f"w{num_warps}", f"s{num_stages}"])
