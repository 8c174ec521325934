"""Compile every shipped kernel config for a GPU architecture without a GPU and check it.

    python -m pace_kernels.compile_check --arch 90

For each kernel module that imports, every entry of its ``compile_specs()`` is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; the bundled
``ptxas -v`` gives registers and spill bytes, the compiler the shared memory a launch asks for, the
PTX whether tensor cores are used (``wgmma`` on sm_90, ``mma.sync`` on sm_80/86/89; docs/design.md section 7).
Each module lists configs per GPU class and is checked with the list ``--arch`` runs. Exit status 1
when an fp16/bf16 row lacks tensor cores, any row spills or needs more shared memory than the arch
has (232,448 B sm_90, 166,912 B sm_80, 101,376 B sm_86/sm_89), or a config fails to compile; only
configs that pass may ship.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import subprocess
import sys
from typing import Iterator, List, Optional, Sequence, Tuple, Union

SIGNATURE_MODULES = {
    "pace_kernels.lora_add": "pace_kernels.compile_check.lora_add_specs",
    "pace_kernels.lora_mul": "pace_kernels.compile_check.lora_mul_specs",
}
"""Each kernel package and the module whose ``compile_specs(arch)`` lists what the check compiles."""
KERNEL_MODULES = list(SIGNATURE_MODULES)


def _signature_module(name: str) -> str:
    # A kernel package ("pace_kernels.lora_add", or "lora_add") names its spec module; any other
    # name is taken as a module with compile_specs() itself.
    return SIGNATURE_MODULES.get(name, SIGNATURE_MODULES.get(f"pace_kernels.{name}", name))


def _load_specs(
    modules: Sequence[str],
    only: Union[None, str, Sequence[str]] = None,
    dtype: Optional[str] = None,
    arch: int = 90,
) -> list:
    """Specs of every importable module; ``only``: keep those whose ``"name config"`` contains one of
    these substrings; ``dtype``: keep one operand dtype (``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    from .machinery import TRITON_DTYPE_NAMES

    if isinstance(only, str):
        only = [only]
    specs = []
    for name in modules:
        try:
            module = importlib.import_module(_signature_module(name))
        except ImportError as exc:
            print(f"# {name}: not imported ({exc}); skipped")
            continue
        if not hasattr(module, "compile_specs"):
            print(f"# {name}: has no compile_specs(); skipped")
            continue
        for spec in module.compile_specs(arch):
            label = f"{spec.name} {spec.note}"
            if only and not any(o in label for o in only):
                continue
            if dtype is not None and TRITON_DTYPE_NAMES.get(spec.dtype) != dtype:
                continue
            specs.append(spec)
    return specs


_specs_being_checked: list = []  # the specs being checked, inherited by forked workers


def _compile_one(job: Tuple[int, int]) -> tuple:
    from .machinery import compile_for_arch

    index, arch = job
    r = compile_for_arch(_specs_being_checked[index], arch)
    return (r.registers, r.spill_stores, r.spill_loads, r.shared_bytes, r.tensor_cores, r.error)


def _compile_all(specs: list, arch: int, jobs: int) -> Iterator:
    """Reports in spec order; compiled by ``jobs`` forked processes (triton.compile is CPU-bound)."""
    from .machinery import CompileReport

    _specs_being_checked[:] = specs
    work = [(i, arch) for i in range(len(specs))]
    if jobs <= 1 or len(specs) <= 1:
        results = map(_compile_one, work)
        pool = None
    else:
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile_one, work)
    try:
        for spec, fields in zip(specs, results):
            regs, st, ld, smem, tensor_cores, error = fields
            yield CompileReport(spec, regs, st, ld, smem, tensor_cores, error, arch=arch)
    finally:
        if pool is not None:
            pool.shutdown()


def run_check(
    arch: int = 90,
    modules: Sequence[str] = KERNEL_MODULES,
    only: Union[None, str, Sequence[str]] = None,
    limit: Optional[int] = None,
    jobs: int = 1,
    dtype: Optional[str] = None,
) -> int:
    """Compile and print the table; return the process exit status (0 all good, 1 otherwise)."""
    from .._triton_utils import MAX_SHARED_BYTES
    from .machinery import TRITON_DTYPE_NAMES

    if arch not in MAX_SHARED_BYTES:
        raise ValueError(f"arch must be one of {sorted(MAX_SHARED_BYTES)}, got {arch}")
    specs = _load_specs(modules, only, dtype, arch)
    if limit is not None:
        specs = specs[:limit]
    if not specs:
        print("no kernel specs found")
        return 1
    header = (
        f"{'kernel':<44} {'dtype':<5} {'config':<44} {'regs':>4} {'spill':>5} {'smem':>6} {'tc':>3}  status"
    )
    print(f"# compile_check for sm_{arch} (shared memory per block: {MAX_SHARED_BYTES[arch]} B)")
    print(header)
    print("-" * len(header))
    failed = 0
    for report in _compile_all(specs, arch, jobs):
        spec = report.spec
        dtype = TRITON_DTYPE_NAMES.get(spec.dtype, str(spec.dtype))
        status = "ok" if report.ok else "FAIL: " + ", ".join(report.problems)
        failed += 0 if report.ok else 1
        print(
            f"{spec.name:<44} {dtype:<5} {spec.note:<44} {report.registers:>4} {report.spill_bytes:>5} "
            f"{report.shared_bytes:>6} {'yes' if report.tensor_cores else 'no':>3}  {status}",
            flush=True,
        )
    print(f"# {len(specs) - failed}/{len(specs)} configs pass")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=[80, 86, 89, 90],  # the archs MAX_SHARED_BYTES knows
        help="CUDA compute capability as an int (90 = Hopper)",
    )
    parser.add_argument("--module", action="append", help="kernel module(s) to check (default: all)")
    parser.add_argument(
        "--only",
        action="append",
        help="check only specs whose 'name config' contains this string (repeatable)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="check only this operand dtype")
    parser.add_argument("--limit", type=int, help="check only the first N matching specs")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="compile in this many processes (default: up to 4)",
    )
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces triton.jit functions with Python ones that cannot be compiled;
        # run again in a fresh process without it.
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        cmd = [sys.executable, "-m", "pace_kernels.compile_check"] + list(
            sys.argv[1:] if argv is None else argv
        )
        return subprocess.call(cmd, env=env)
    return run_check(args.arch, args.module or KERNEL_MODULES, args.only, args.limit, args.jobs, args.dtype)

