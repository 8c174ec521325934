"""``python -m pace_kernels.compile_check``: sm_80/86/89/90 compiles without a GPU (docs/design.md section 7),
and the per-GPU-class config lists the launches are pruned to.

The full check (every kernel, every shipped config, four archs) runs in CI as its own step; here a
few worst-case configs are compiled in a subprocess (the test process runs Triton's interpreter,
which cannot compile) and the pass/fail logic is checked on made-up reports.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pace_kernels import _triton_utils, lora_add, lora_mul
from pace_kernels._triton_utils import (
    MAX_SHARED_BYTES,
    all_configs,
    autotune_for_device,
    config_arch_for_shared_memory,
    configs_for_arch,
    prune_configs,
)
from pace_kernels.compile_check import lora_add_specs, lora_mul_specs, machinery
from pace_kernels.compile_check.machinery import CompileReport, CompileSpec, parse_ptxas, ptxas_path

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
    proc = _run(
        [
            "--arch",
            "90",
            "--module",
            "pace_kernels.lora_add",
            "--dtype",
            "bf16",
            "--jobs",
            "2",
            "--only",
            "lora_add_fwd gather r16 BM128 BN128 BK64",
            "--only",
            "lora_add_bwd_dx segments r64 BM128 BK128 BD64",
        ]
    )
    rows = _rows(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(rows) == 2, proc.stdout
    for row in rows:
        cols = row.split()
        regs, spill, smem, tensor_cores, status = cols[-5:]
        assert (spill, tensor_cores, status) == ("0", "yes", "ok"), row
        assert int(regs) <= 255 and int(smem) > 0


@needs_compiler
def test_spilling_config_fails_the_check() -> None:
    """docs/design.md section 7: 4 warps on a 128x128x64 tile spill; the check must exit 1 and say why."""
    code = (
        "import sys, pace_kernels.lora_add as la\n"
        "la.FWD_CONFIGS_16[90] = [la.configs._cfg(128, 128, 64, 4, 3)]\n"
        "from pace_kernels.compile_check import run_check\n"
        "sys.exit(run_check(90, ['pace_kernels.compile_check.lora_add_specs'],\n"
        "                   only='lora_add_fwd gather r64', dtype='bf16'))\n"
    )
    proc = _run([], code=code)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = _rows(proc.stdout)
    assert "FAIL: spills" in row


def test_specs_name_every_kernel_argument() -> None:
    """Each spec types every argument of its kernel, so compile_check compiles what launches run."""
    specs = lora_add_specs.compile_specs()
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
    assert not CompileReport(spec(torch.bfloat16), 200, 0, 0, 1000, False).ok  # 16-bit needs tensor cores
    assert CompileReport(spec(torch.float32), 200, 0, 0, 1000, False).ok
    assert not CompileReport(spec(torch.float16), 255, 8, 8, 1000, True).ok  # spills
    assert not CompileReport(spec(torch.float16), 200, 0, 0, 300_000, True).ok  # over 227 KB smem
    assert not CompileReport(spec(torch.float16), error="boom").ok


@pytest.mark.parametrize("arch, fits", [(90, True), (80, True), (86, False), (89, False)])
def test_shared_memory_verdict_follows_the_arch(arch: int, fits: bool) -> None:
    """122,880 B (the old 16-bit lora_mul two-GEMM dX config) fits Hopper and A100, not 99 KiB parts."""
    report = CompileReport(
        CompileSpec("k", lambda: None, {}, {}, 8, 4, torch.bfloat16), 187, 0, 0, 122_880, True, arch=arch
    )
    assert report.ok == fits
    if not fits:
        assert report.problems == [f"shared memory over the sm_{arch} limit (101376 B)"]


def test_tensor_cores_are_named_per_arch() -> None:
    """wgmma exists only on sm_90; sm_8x tensor cores are mma.sync: the report says which is missing."""
    assert machinery.tensor_core_instruction(90) == "wgmma"
    for arch in (80, 86, 89):
        assert machinery.tensor_core_instruction(arch) == "mma.sync.aligned"
        report = CompileReport(
            CompileSpec("k", lambda: None, {}, {}, 8, 3, torch.float16), 100, 0, 0, 1000, False, arch=arch
        )
        assert report.problems == ["no mma.sync.aligned"]


def _config_tables():
    """Every (name, table) of configs the kernel modules autotune over: {arch: [Config]}."""
    tables = {
        f"lora_add.{n}": getattr(lora_add.configs, n)
        for n in dir(lora_add.configs)
        if n.endswith("_CONFIGS_16") or n.endswith("_CONFIGS_32")
    }
    for n in dir(lora_mul.configs):
        if n.endswith("_CONFIGS_16") or n.endswith("_CONFIGS_32"):
            table = getattr(lora_mul.configs, n)
            if n.startswith("SAMPLE_"):
                tables.update({f"lora_mul.{n}[{bm}]": t for bm, t in table.items()})
            else:
                tables[f"lora_mul.{n}"] = table
    return tables


def test_every_config_list_has_configs_for_every_gpu_class() -> None:
    tables = _config_tables()
    assert len(tables) == 6 + 16  # lora_mul: 12, plus the two-GEMM kernels' factor-build lists (4)
    for name, table in tables.items():
        assert set(table) == {90, 80, 86}, name
        for arch in (80, 86, 89, 90):
            assert configs_for_arch(table, arch), (name, arch)


@pytest.mark.parametrize(
    "shared_bytes, arch",
    [(232_448, 90), (300_000, 90), (166_912, 80), (232_447, 80), (101_376, 86), (166_911, 86), (65_536, 86)],
)
def test_device_shared_memory_picks_the_largest_class_that_fits(shared_bytes: int, arch: int) -> None:
    """A100 and sm_87 (163 KiB) get the sm_80 lists, RTX/L4/L40S (99 KiB) the sm_86 ones, and a device
    with less than any class the smallest (its autotuner skips what still does not fit)."""
    assert config_arch_for_shared_memory(shared_bytes) == arch


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_pruning_keeps_exactly_the_configs_checked_for_the_device(arch: int) -> None:
    """Every config the pruning keeps for a device was compile-checked for its class, in list order;
    with autotuning off, only the list's first (the one compile_check calls the default)."""
    key = _triton_utils._config_key
    for name, table in _config_tables().items():
        union = all_configs(table)
        assert len({key(c) for c in union}) == len(union), name
        checked = [key(c) for c in configs_for_arch(table, arch)]
        kept = prune_configs(union, table, MAX_SHARED_BYTES[arch], autotune=True)
        assert [key(c) for c in kept] == checked, (name, arch)
        first = prune_configs(union, table, MAX_SHARED_BYTES[arch], autotune=False)
        assert [key(c) for c in first] == checked[:1], (name, arch)


def test_the_autotuner_prunes_to_the_launching_device(monkeypatch) -> None:
    """The autotuner a kernel module builds holds every class's configs and keeps, at launch, those
    of the device's class: a 99 KiB device never gets the Hopper-only 16-bit two-GEMM dX configs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PACE_KERNELS_AUTOTUNE", raising=False)
    table = lora_mul.TWO_GEMM_DX_CONFIGS_16
    tuner = autotune_for_device(
        lora_mul.kernels._lora_mul_dx_two_gemm_kernel,
        table,
        lora_mul.configs._INTERP_CONFIG,
        ("n_rows", "D", "K"),
    )
    key = _triton_utils._config_key
    assert [key(c) for c in tuner.configs] == [key(c) for c in all_configs(table)]
    for shared, arch in ((101_376, 86), (166_912, 80), (232_448, 90)):
        monkeypatch.setattr(_triton_utils, "device_shared_memory", lambda device=None, s=shared: s)
        kept = tuner.early_config_prune(tuner.configs, {})
        assert [key(c) for c in kept] == [key(c) for c in table[arch]], arch
    monkeypatch.setenv("PACE_KERNELS_AUTOTUNE", "0")
    assert [key(c) for c in tuner.early_config_prune(tuner.configs, {})] == [key(table[90][0])]


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_compile_specs_follow_the_arch(arch: int) -> None:
    """compile_check --arch N compiles exactly the configs sm_N runs, for every kernel and dtype."""
    for module, table in (
        (lora_add_specs, lora_add.DX_CONFIGS_16),
        (lora_mul_specs, lora_mul.TWO_GEMM_DX_CONFIGS_16),
    ):
        specs = module.compile_specs(arch)
        assert {s.dtype for s in specs} == {torch.float16, torch.bfloat16, torch.float32}
        name = "lora_add_bwd_dx gather r16" if module is lora_add_specs else "lora_mul_dx two-GEMM"
        rows = [s for s in specs if s.name == name and s.dtype == torch.bfloat16]
        assert [(s.num_warps, s.num_stages) for s in rows] == [
            (c.num_warps, c.num_stages) for c in configs_for_arch(table, arch)
        ]


@needs_compiler
@pytest.mark.parametrize("arch", [86, 80])
def test_sm8x_lists_compile_with_mma_and_fit(arch: int) -> None:
    """The issue's case: every 16-bit lora_mul backward at T = 197 runs the two-GEMM dX kernel, which
    had no config fitting 99 KiB. Each sm_8x config compiles with mma.sync, no spills, and fits."""
    proc = _run(
        [
            "--arch",
            str(arch),
            "--module",
            "pace_kernels.lora_mul",
            "--dtype",
            "bf16",
            "--jobs",
            "2",
            "--only",
            "lora_mul_dx two-GEMM",
        ]
    )
    rows = _rows(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(rows) == len(lora_mul.TWO_GEMM_DX_CONFIGS_16[arch]), proc.stdout
    for row in rows:
        regs, spill, smem, tensor_cores, status = row.split()[-5:]
        assert (spill, tensor_cores, status) == ("0", "yes", "ok"), row
        assert 0 < int(smem) <= MAX_SHARED_BYTES[arch]


@needs_compiler
def test_config_over_the_shared_memory_of_sm86_fails_the_check() -> None:
    """A config that fits Hopper but not a 99 KiB part (172,032 B on sm_86) fails --arch 86."""
    code = (
        "import sys, pace_kernels.lora_mul as lm\n"
        "lm.TWO_GEMM_DX_CONFIGS_16[86] = [lm.configs._cfg(64, 128, 64, 4, 4)]\n"
        "from pace_kernels.compile_check import run_check\n"
        "sys.exit(run_check(86, ['pace_kernels.compile_check.lora_mul_specs'],\n"
        "                   only='lora_mul_dx two-GEMM', dtype='fp16'))\n"
    )
    proc = _run([], code=code)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = _rows(proc.stdout)
    assert "shared memory over the sm_86 limit (101376 B)" in row, row
