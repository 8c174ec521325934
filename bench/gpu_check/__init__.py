"""Correctness of the fused ops on the device they run on, and a launcher for compute-sanitizer.

    python -m bench.gpu_check check  [--json OUT.json] [--jobs N] [--size auto|full|small]
    python -m bench.gpu_check launch [--json OUT.json] [--dtypes bf16,fp32] [--subset all|race]

``check``: every fused op (``lora_add``, ``lora_mul`` with and without per-sample noise, and
``rlrr`` / ``lora_mul_vpt_add`` through :class:`pace.PaceLinear`) with ``backend="triton"`` against a
float64 evaluation of the reference, forward and every gradient, at ViT-B shapes (N = 2 x 64 x 197
rows; D/K 768, 2304, 3072), LLM shapes (T = 2048, D = K = 4096, and a ragged variant) and a small
ragged shape at ranks 1, 18 and 64; bf16 and fp16 (fp32 at two shapes). The criterion is the kernel
tests' (tests/pace_kernels/_cases.py): the kernel's error, relative to the largest magnitude of the
float64 result, may be at most twice the error of the reference run in the same dtype plus a floor.
Then one PACE training step of a timm ViT with gradient checkpointing, fused against the reference.
The groups run in parallel processes (Triton compiles on the CPU, one kernel at a time per process);
each writes its results after every case, so a run stopped by a timeout keeps what it finished.
Exit code 0 when every case passed, 1 otherwise. ``bench/run_gpu.sh`` runs it with
``PACE_KERNELS_AUTOTUNE=0`` (the first config of each list, no autotuning), so the phase costs
compile time only; the benchmarks then exercise the autotuned configs, each contender's forward
checked against the reference before it is timed.

``launch``: every kernel launched once or a few times at ragged shapes (T = 197 and T = 1; D and K
not multiples of any tile), forward and backward, with and without noise, input gradient or not,
the split and unsplit dM paths. Meant to run under ``compute-sanitizer``; it also reports which
Triton kernels of :mod:`pace_kernels` were compiled for the device (and so launched), so a kernel the
driver misses shows up by name.

On a machine without CUDA both commands run on CPU through Triton's interpreter at small shapes
(the dry run of ``bench/run_gpu.sh``).

Layout: :mod:`.results` (error measures, the criterion, the result records), :mod:`.ops` (the op
cases), :mod:`.model_step` (the checkpointed ViT step), :mod:`.check` (groups, worker processes,
verdict), :mod:`.launch` (the compute-sanitizer driver); :func:`main` is the command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

# Before anything can import triton (docs/design.md section 7): the CPU dry run needs the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .check import check_main, group_names, summarise  # noqa: E402
from .launch import launch_main, launched_kernels  # noqa: E402
from .ops import OpCase, op_cases, run_functional_case, run_pacelinear_case  # noqa: E402
from .results import compare, max_rel_error, rel_l2_error  # noqa: E402

# The names the tests reach through the package; the rest live in their modules.
__all__ = [
    "OpCase",
    "compare",
    "group_names",
    "launched_kernels",
    "main",
    "max_rel_error",
    "op_cases",
    "rel_l2_error",
    "run_functional_case",
    "run_pacelinear_case",
    "summarise",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="fused ops and a checkpointed model step against the reference")
    check.add_argument("--json", help="write the results here")
    check.add_argument("--jobs", type=int, default=0, help="parallel groups (10 on CUDA, 1 on CPU)")
    check.add_argument(
        "--size",
        default="auto",
        choices=("auto", "full", "small"),
        help="full: ViT-B and LLM shapes (default on CUDA); small: tiny shapes (CPU)",
    )
    check.add_argument("--group", help=argparse.SUPPRESS)  # one group, in a worker process
    check.add_argument("--work", help="folder for the per-group files (default: beside --json)")
    launch = sub.add_parser("launch", help="launch every kernel once (run it under compute-sanitizer)")
    launch.add_argument("--json", help="write what was launched here")
    launch.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    launch.add_argument(
        "--subset",
        default="all",
        choices=("all", "race"),
        help="race: the two main paths of each op only (racecheck is slow)",
    )
    args = parser.parse_args(argv)
    return check_main(args) if args.command == "check" else launch_main(args)
