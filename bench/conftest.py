"""Benchmark-wide setup: a synchronising timer on CUDA, the timing/memory helper, and extra JSON.

The JSON that ``--benchmark-json`` writes gets a ``"pace"`` section (:func:`pytest_benchmark_update_json`):
versions, device, which set ran (full or reduced, and why), and every skipped benchmark with its
reason, so :mod:`bench.report` can say what is missing and why.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from typing import Any, Callable

import pytest
import torch

from bench import specs

_SKIPPED: list[dict[str, str]] = []


def _raise_dynamo_limits() -> None:
    # Each (op, shape, dtype) compiles its own graph; the default recompile limit (8) would silently
    # fall back to eager for the later ones.
    try:
        import torch._dynamo as dynamo
    except Exception:  # torch without dynamo: the compiled contender skips itself
        return
    names = ("recompile_limit", "cache_size_limit",
             "accumulated_recompile_limit", "accumulated_cache_size_limit")
    for name in names:
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 512))


_raise_dynamo_limits()

# On CPU the benchmarks run single-threaded unless PACE_BENCH_THREADS says otherwise: on a small
# shared machine a multi-threaded GEMM stalls whenever one of its threads is descheduled, which
# scatters the rounds far more than it speeds them up. The count used is recorded in the JSON.
if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("PACE_BENCH_THREADS", "1")))


def cuda_timer() -> float:
    """``perf_counter`` after draining the GPU queue, so a timed loop measures kernels, not launches."""
    torch.cuda.synchronize()
    return time.perf_counter()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


class Timing:
    """Warm-up, calibration and ``benchmark.pedantic`` for one contender, plus its peak memory.

    Warm-up calls run before any timing, so ``torch.compile`` and Triton autotuning are never timed.
    Rounds and the target length of a round come from ``PACE_BENCH_ROUNDS`` / ``PACE_BENCH_ROUND_S``.
    Peak memory is read over the timed calls (every call is the same work), so it costs no extra call.
    """

    CPU_MEMORY = {"peak_mem_bytes": None, "peak_mem_extra_bytes": None,
                  "mem_method": "not measured on CPU (torch CPU allocations are invisible to tracemalloc)"}

    def __init__(self, device: str):
        self.device = device
        cuda = device == "cuda"
        self.rounds = _env_int("PACE_BENCH_ROUNDS", 10 if cuda else 7)
        self.round_s = _env_float("PACE_BENCH_ROUND_S", 0.02 if cuda else 0.05)
        self.warmup = _env_int("PACE_BENCH_WARMUP", 3 if cuda else 1)
        self.timer: Callable[[], float] = cuda_timer if cuda else time.perf_counter
        self.memory: dict[str, Any] = dict(self.CPU_MEMORY)

    def run(self, benchmark, fn: Callable[[], Any], *, warmup: int | None = None,
            rounds: int | None = None, round_s: float | None = None) -> float | None:
        """Time ``fn`` with pytest-benchmark; returns the median seconds per call (None when
        benchmarking is disabled, e.g. ``--benchmark-disable``: then ``fn`` runs once). Afterwards
        :attr:`memory` holds the peak bytes allocated during the calls, absolute and above what was
        allocated before them (None on CPU)."""
        self.memory = dict(self.CPU_MEMORY)
        if benchmark.disabled:
            fn()
            return None
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = self.timer()
        fn()
        once = max(self.timer() - t0, 1e-7)
        iterations = max(1, min(10_000, int((self.round_s if round_s is None else round_s) / once)))
        if cuda:
            # pytest-benchmark reads the clock through this attribute; synchronising there times the
            # whole loop of asynchronous launches rather than the launches alone.
            benchmark._timer = cuda_timer
        benchmark.pedantic(fn, rounds=self.rounds if rounds is None else rounds, iterations=iterations,
                           warmup_rounds=0)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.memory = {"peak_mem_bytes": int(peak), "peak_mem_extra_bytes": int(peak - before),
                           "mem_method": "torch.cuda.max_memory_allocated"}
        return float(benchmark.stats.stats.median)


@pytest.fixture(scope="session")
def bench_device() -> str:
    return specs.device()


@pytest.fixture(scope="session")
def timing(bench_device) -> Timing:
    return Timing(bench_device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report) -> None:
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _SKIPPED.append({"nodeid": report.nodeid, "reason": reason})


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    dev = specs.device()
    full = specs.full_set()
    rule = os.environ.get(specs.FULL_ENV)
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": dev,
        "device_name": torch.cuda.get_device_name(0) if dev == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "set": "full" if full else "reduced",
        "set_rule": (f"{specs.FULL_ENV}={rule}" if rule else
                     f"{specs.FULL_ENV} unset: {'CUDA available' if dev == 'cuda' else 'no CUDA'}"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "peft": _version("peft"),
        "pytest_benchmark": _version("pytest_benchmark"),
        "command": " ".join(["pytest", *sys.argv[1:]]),
        "rounds": os.environ.get("PACE_BENCH_ROUNDS"),
        "round_s": os.environ.get("PACE_BENCH_ROUND_S"),
    }
    return info


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    output_json["pace"] = {"environment": environment(), "skipped": list(_SKIPPED)}
