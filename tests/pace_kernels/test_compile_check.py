"""``python -m pace_kernels.compile_check``: sm_90 compiles without a GPU (SPEC section 7).

The full check (every kernel, every shipped config) runs in CI as its own step; here a few
worst-case configs are compiled in a subprocess (the test process runs Triton's interpreter, which
cannot compile) and the pass/fail logic is checked on made-up reports.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pace_kernels._triton_utils import CompileReport, CompileSpec, parse_ptxas, ptxas_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cuda_compiler_usable() -> str:
    """Why triton's CUDA compiler cannot be used here, or "" when it can."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton has no usable nvidia backend ({exc})"
    path = ptxas_path()
    if not os.access(path, os.X_OK):
        return f"no executable ptxas at {path}"
    return ""


needs_compiler = pytest.mark.skipif(bool(_cuda_compiler_usable()), reason=_cuda_compiler_usable() or "ok")


def _run(args, code: str = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable] + (["-c", code] if code else ["-m", "pace_kernels.compile_check"] + args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(out: str):
    return [line for line in out.splitlines() if line.startswith("lora_")]


@needs_compiler
def test_worst_case_configs_use_wgmma_without_spills() -> None:
    """The configs with the highest register counts (the largest tiles), forward and dX kernels."""
    proc = _run(["--arch", "90", "--module", "pace_kernels.lora_add", "--dtype", "bf16", "--jobs", "2",
                 "--only", "lora_add_fwd gather r16 BM128 BN128 BK64",
                 "--only", "lora_add_bwd_dx segments r64 BM128 BK128 BD64"])
    rows = _rows(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(rows) == 2, proc.stdout
    for row in rows:
        cols = row.split()
        regs, spill, smem, wgmma, status = cols[-5:]
        assert (spill, wgmma, status) == ("0", "yes", "ok"), row
        assert int(regs) <= 255 and int(smem) > 0


@needs_compiler
def test_spilling_config_fails_the_check() -> None:
    """SPEC section 7: 4 warps on a 128x128x64 tile spill; the check must exit 1 and say why."""
    code = (
        "import sys, pace_kernels.lora_add as la\n"
        "la.FWD_CONFIGS_16[:] = [la._cfg(128, 128, 64, 4, 3)]\n"
        "from pace_kernels.compile_check import run_check\n"
        "sys.exit(run_check(90, ['pace_kernels.lora_add'], only='lora_add_fwd gather r64', dtype='bf16'))\n"
    )
    proc = _run([], code=code)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = _rows(proc.stdout)
    assert "FAIL: spills" in row


def test_specs_name_every_kernel_argument() -> None:
    """Each spec types every argument of its kernel, so compile_check compiles what launches run."""
    from pace_kernels import lora_add

    specs = lora_add.compile_specs()
    assert {s.name.split()[0] for s in specs} == {"lora_add_fwd", "lora_add_bwd_dx", "lora_add_rank_grad"}
    assert {s.dtype for s in specs} == {torch.float16, torch.bfloat16, torch.float32}
    for spec in specs:
        args = set(spec.fn.arg_names)
        assert set(spec.signature) | set(spec.constexprs) == args, spec.name
        assert not set(spec.signature) & set(spec.constexprs), spec.name
        assert set(spec.divisible) <= set(spec.signature), spec.name


def test_parse_ptxas() -> None:
    text = (
        "ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for _fwd_kernel\n"
        "    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert parse_ptxas(text) == (255, 24, 16)
    with pytest.raises(ValueError):
        parse_ptxas("nothing here")


def test_report_verdicts() -> None:
    def spec(dtype):
        return CompileSpec("k", lambda: None, {}, {}, 8, 3, dtype)

    assert CompileReport(spec(torch.bfloat16), 200, 0, 0, 1000, True).ok
    assert not CompileReport(spec(torch.bfloat16), 200, 0, 0, 1000, False).ok  # 16-bit needs wgmma
    assert CompileReport(spec(torch.float32), 200, 0, 0, 1000, False).ok
    assert not CompileReport(spec(torch.float16), 255, 8, 8, 1000, True).ok  # spills
    assert not CompileReport(spec(torch.float16), 200, 0, 0, 300_000, True).ok  # over 227 KB smem
    assert not CompileReport(spec(torch.float16), error="boom").ok
