"""Runtime pieces both kernel families share: interpreter detection, per-arch configs and the
autotuner, the dot helper, torch.library registration and operand preparation (docs/design.md
section 9.1). The compile machinery is in :mod:`pace_kernels.compile_check`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Callable

import torch

try:  # the module must import (for is_interpreting, CompileSpec) even where triton is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
    tl = None


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_rank(rank: int) -> int:
    """The rank as the kernels see it: a power of two >= 16 (the smallest ``tl.dot`` K/N size)."""
    return max(16, triton.next_power_of_2(rank))


# --------------------------------------------------------------------------------------------
# Autotuning: real lists on a GPU, one fixed config in the interpreter.

def autotune_enabled() -> bool:
    """Whether kernels autotune over their Hopper config lists.

    Off in the interpreter, where every config would be *run* (slowly) to time it. The environment
    variable ``PACE_KERNELS_AUTOTUNE=0`` also turns it off on a GPU (first config of each list is
    used), which makes start-up fast and launches reproducible across processes.
    """
    if is_interpreting():
        return False
    return os.environ.get("PACE_KERNELS_AUTOTUNE", "1") not in ("", "0")


MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Shared memory one block may use, per compute capability (a config over it fails at launch)."""


# --------------------------------------------------------------------------------------------
# Configs per GPU class. A kernel's configs are listed per checked architecture (the keys of
# MAX_SHARED_BYTES' classes: 90 Hopper, 80 A100, 86 for the 99 KiB parts), and every list is
# compiled for its architectures by ``python -m pace_kernels.compile_check --arch N``, which
# fails a config that spills or asks for more shared memory than the arch has. At launch the
# autotuner's ``early_config_prune`` keeps the list for the running device's shared memory, so
# with or without autotuning no launch asks for more than the device has. A shared-memory
# formula per kernel would be a guess (pipelining, layout conversions and the epilogue all take
# shared memory); the compiled numbers are facts.

ConfigsByArch = dict  # {checked arch: [triton.Config, ...]}, the first entry the default


def _arch_classes() -> list[tuple[int, int]]:
    """``(shared bytes, arch)`` for the archs that own a config list, largest first."""
    by_limit: dict[int, int] = {}
    for arch, limit in MAX_SHARED_BYTES.items():
        by_limit[limit] = min(arch, by_limit.get(limit, arch))
    return sorted(by_limit.items(), reverse=True)


def config_arch_for_shared_memory(shared_bytes: int) -> int:
    """The checked arch whose configs a device with ``shared_bytes`` per block runs: the one with the
    largest limit that fits (90 for 227 KiB, 80 for 163 KiB, 86 for 99 KiB); the smallest class for
    devices with less (their autotuner skips what does not fit)."""
    classes = _arch_classes()
    for limit, arch in classes:
        if shared_bytes >= limit:
            return arch
    return classes[-1][1]


def configs_for_arch(table: ConfigsByArch, arch: int) -> list[Any]:
    """The configs of ``table`` that ``sm_<arch>`` runs (and compile_check checks for it)."""
    if arch in table:
        return list(table[arch])
    limit = MAX_SHARED_BYTES.get(arch)
    if limit is None:
        raise ValueError(f"arch must be one of {sorted(MAX_SHARED_BYTES)}, got {arch}")
    return list(table[config_arch_for_shared_memory(limit)])


def _config_key(config: Any) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def all_configs(table: ConfigsByArch) -> list[Any]:
    """Every config of ``table`` once, in arch order: what the autotuner is built with."""
    seen: dict[tuple, Any] = {}
    for configs in table.values():
        for config in configs:
            seen.setdefault(_config_key(config), config)
    return list(seen.values())


def device_shared_memory(device: int | None = None) -> int:
    """Shared memory one block may use on a CUDA device (the opt-in maximum), in bytes."""
    index = torch.cuda.current_device() if device is None else device
    return _device_shared_memory(index)


@functools.cache
def _device_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if limit:
        return int(limit)
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def prune_configs(configs: Sequence[Any], table: ConfigsByArch, shared_bytes: int,
                  autotune: bool) -> list[Any]:
    """Those of ``configs`` that ``table`` lists for a device with ``shared_bytes`` per block, in the
    list's order; only the first of them when not ``autotune``."""
    wanted = [_config_key(c) for c in table[config_arch_for_shared_memory(shared_bytes)]]
    kept = [c for c in configs if _config_key(c) in wanted]
    kept.sort(key=lambda c: wanted.index(_config_key(c)))
    if not kept:
        raise ValueError("none of the autotuner's configs is listed for this device's shared memory")
    return kept if autotune else kept[:1]


def _launch_device(named_args: dict[str, Any]) -> int | None:
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return value.device.index
    return None


def autotune_for_device(fn: Callable, table: ConfigsByArch, interpreter_config: Any,
                        key: Sequence[str]) -> Any:
    """``triton.autotune`` over ``table`` pruned to the launching device's configs (see above);
    one fixed ``interpreter_config`` in the interpreter. With autotuning off
    (``PACE_KERNELS_AUTOTUNE=0``) the device's first config runs."""
    if is_interpreting():
        return triton.autotune([interpreter_config], key=list(key))(fn)

    def prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        shared = device_shared_memory(_launch_device(named_args))
        return prune_configs(configs, table, shared, autotune_enabled())

    prune_by = {"early_config_prune": prune}
    return triton.autotune(all_configs(table), key=list(key), prune_configs_by=prune_by)(fn)


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether dot operands must be upcast to fp32: in the interpreter ``tl.dot`` on bfloat16
    operands returns garbage (docs/design.md section 7); fp16 and fp32 are right there."""
    return is_interpreting() and dtype == torch.bfloat16


def fp32_dot_precision() -> str:
    """``input_precision`` for fp32 operands: follow torch's own switch. Where torch would use tf32,
    so do the kernels; otherwise ``tf32x3`` (three tf32 products, about fp32 accuracy, still on
    tensor cores). Plain ``ieee`` FMA dots spill registers at rank 64 in every tile tried on sm_90."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """``(UPCAST, PRECISION)`` constexprs for dots on ``dtype`` operands: :func:`dot_upcast`, and
    :func:`fp32_dot_precision` for fp32 (fp16/bf16 dots ignore the precision; they get ``"tf32"``)."""
    return dot_upcast(dtype), fp32_dot_precision() if dtype == torch.float32 else "tf32"


def jit_helper(fn: Callable) -> Callable:
    """``triton.jit`` for a helper that kernels call; under the interpreter the plain function.

    The interpreter re-patches ``triton.language`` on every call of a nested jit function (about
    10 ms each, more than the arithmetic of a small tile), while a plain Python function called
    from an interpreted kernel runs as is. Helpers must then avoid Python builtins that the
    compiler rewrites (use ``tl.minimum``, not ``min``).
    """
    if is_interpreting():
        return fn
    return triton.jit(fn)


if triton is not None:

    # Noise modes: the ``NOISE`` constexpr of every kernel with noise variants, one vocabulary for
    # both op families. Kernels compare against these names; hosts pass ``.value`` (a plain int, so
    # launches and traced graphs carry ints). Each kernel's docstring says which modes it takes.
    NOISE_NONE = tl.constexpr(0)
    """No noise: ``Zr`` is 1."""
    NOISE_GATHER = tl.constexpr(1)
    """A noise row per row, gathered as ``row // rows_per_noise`` (any noise layout)."""
    NOISE_SEGMENTS = tl.constexpr(2)
    """Per-sample noise, a row tile holding rows of at most two samples (``lora_add``)."""
    NOISE_SAMPLE = tl.constexpr(3)
    """Per-sample noise, every row tile inside one sample, whose noise row it loads once (``lora_mul``)."""

    @jit_helper
    def cdiv(a, b):
        """``ceil(a / b)`` inside kernels; ``tl.cdiv`` is itself a jit function, which the interpreter
        re-patches on every call (about 4 ms)."""
        return (a + b - 1) // b

    @jit_helper
    def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """``(pid_m, pid_n)`` of program ``pid`` in grouped order (the Triton matmul tutorial's):
        ``GROUP_M`` consecutive row tiles sweep the column tiles together, so the weight tiles they
        share stay in L2. ``num_pid_m`` is a count, not a size, so callers whose row tiles are laid
        out per sample (``lora_mul``) pass their own."""
        width = GROUP_M * num_pid_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n

    @jit_helper
    def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """``acc + a @ b`` with fp32 accumulation; ``UPCAST`` works around the interpreter's bf16 dot."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)


# --------------------------------------------------------------------------------------------
# torch.library registration.

def wrap_triton(kernel: Any) -> Any:
    """``torch.library.wrap_triton`` where this torch has it (``capture_triton`` in 2.5), else the
    kernel itself: a launch through it is traceable by make_fx / torch.compile."""
    wrapper = getattr(torch.library, "wrap_triton", None) or getattr(torch.library, "capture_triton", None)
    if wrapper is None or is_interpreting():
        return kernel
    return wrapper(kernel)


def uses_triton_op() -> bool:
    """Whether :func:`register_op` makes a Triton-aware op (``torch.library.triton_op``, torch >= 2.6).

    Not in the interpreter: a triton_op is traced into (its body must run on fake tensors), and an
    interpreted kernel cannot run on them; there the op stays opaque with a registered fake."""
    return hasattr(torch.library, "triton_op") and not is_interpreting()


def register_op(qualname: str, fn: Callable, fake: Callable, *, mutates_args: Sequence[str] = (),
                schema: str | None = None) -> Any:
    """Register ``fn`` (which launches Triton kernels through :func:`wrap_triton`) as the op
    ``qualname`` (``"pace::name"``) and return its ``CustomOpDef`` (``.register_autograd`` etc.).

    With ``torch.library.triton_op`` the body is traced into by torch.compile, so Inductor sees the
    kernels and ``fn`` itself serves as the fake; otherwise ``torch.library.custom_op`` keeps the op
    opaque and ``fake`` (shapes only) is registered for tracing. ``schema`` (``"(Tensor x, ...) ->
    Tensor"``) spares torch inferring it from type hints, which older versions cannot do when the
    module uses ``from __future__ import annotations``.
    """
    kw: dict[str, Any] = {"mutates_args": tuple(mutates_args)}
    if schema is not None:
        kw["schema"] = schema
    if uses_triton_op():
        return torch.library.triton_op(qualname, fn, **kw)
    op = torch.library.custom_op(qualname, fn, **kw)
    op.register_fake(fake)
    return op


# --------------------------------------------------------------------------------------------
# Operands as the kernels read them.

def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t.contiguous()``, or None for None: for the operands a kernel reads with unit stride."""
    return None if t is None else t.contiguous()


def frozen_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen ``W0`` as the kernels read it: in the operand ``dtype``, row-major.

    Under autocast the ops get the fp32 master weight, and their autograd saves that (the
    parameter itself, no new memory); the low-precision copy made here lives only for one
    forward or backward call. Casting once per call costs ``6 D K`` bytes of traffic (read fp32,
    write bf16) against a kernel that reads ``W0`` once per row tile: cheaper than loading fp32
    tiles in the kernel, which would double the weight bytes of every tile read. A weight already
    in ``dtype`` and contiguous is returned as is."""
    # .to(memory_format=contiguous_format) would keep a transposed view as it is.
    return weight.to(dtype).contiguous()


