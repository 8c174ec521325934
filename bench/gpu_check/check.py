"""``python -m bench.gpu_check check``: the groups, one worker process per group, and the verdict.

The groups run in parallel processes (Triton compiles on the CPU, one kernel at a time per process);
each writes its results after every case, so a run stopped by a timeout keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .model_step import run_model_checks
from .ops import OPS, OpCase, op_cases, run_functional_case, run_pacelinear_case
from .results import CaseResult, write_json


def group_names(size: str) -> list[str]:
    dtypes = ("bf16", "fp16", "fp32") if size == "full" else ("fp32", "bf16")
    # The model group first: it is the longest.
    return ["model", *(f"{op}-{dt}" for dt in dtypes for op in OPS)]


def run_group(group: str, size: str, device: str, json_path: str | None) -> list[CaseResult]:
    """Run one group's cases one after another, writing the results after each."""
    results: list[CaseResult] = []

    def record(res: CaseResult) -> None:
        results.append(res)
        print(res.summary(), flush=True)
        write_json(json_path, {"group": group, "results": [r.to_json() for r in results]})

    if group == "model":
        t0 = time.perf_counter()
        try:
            for res in run_model_checks(size, device):
                record(res)
        except Exception as exc:  # recorded as a failed case; the other groups go on
            record(
                CaseResult(
                    "model",
                    "ViT PACE step with checkpointing",
                    time.perf_counter() - t0,
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
        return results
    op, dtype = group.rsplit("-", 1)
    runner: Callable[[OpCase, str], CaseResult] = (
        run_pacelinear_case if op == "pacelinear" else run_functional_case
    )
    for case in op_cases(op, dtype, size):
        t0 = time.perf_counter()
        try:
            res = runner(case, device)
        except Exception as exc:
            res = CaseResult(group, case.name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        res.seconds = time.perf_counter() - t0
        record(res)
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def summarise(
    results: Sequence[dict[str, Any]], expected_groups: Sequence[str], finished_groups: Iterable[str]
) -> dict[str, Any]:
    """Counts and the verdict line from the JSON of every case (pure: tested on CPU)."""
    passed = sum(1 for r in results if r.get("ok"))
    errors = sum(1 for r in results if r.get("error"))
    failed = len(results) - passed - errors
    unfinished = [g for g in expected_groups if g not in set(finished_groups)]
    ok = bool(results) and passed == len(results) and not unfinished
    status = "PASS" if ok else ("INCOMPLETE" if passed == len(results) else "FAIL")
    verdict = f"{status}: {passed}/{len(results)} cases passed"
    if failed:
        verdict += f", {failed} failed"
    if errors:
        verdict += f", {errors} raised"
    if unfinished:
        verdict += f"; groups not finished: {', '.join(unfinished)}"
    return {
        "ok": ok,
        "passed": passed,
        "failed": failed,
        "errors": errors,
        "cases": len(results),
        "unfinished_groups": unfinished,
        "verdict": verdict,
    }


def _environment(device: str) -> dict[str, Any]:
    import triton

    env = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "autotune": os.environ.get("PACE_KERNELS_AUTOTUNE", "1"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name(0)
    return env


def check_main(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size if args.size != "auto" else ("full" if device == "cuda" else "small")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 kernels then use tf32x3 (fp32 accuracy)
    if args.group:
        results = run_group(args.group, size, device, args.json)
        return 0 if results and all(r.ok for r in results) else 1

    groups = group_names(size)
    work = args.work or os.path.dirname(os.path.abspath(args.json or "gpu_check.json"))
    os.makedirs(work, exist_ok=True)
    jobs = max(1, args.jobs or (10 if device == "cuda" else 1))
    pending = list(groups)
    running: dict[str, subprocess.Popen] = {}
    logs: dict[str, Any] = {}
    t0 = time.perf_counter()
    print(f"gpu_check: {len(groups)} groups on {device} ({size} shapes), {jobs} at a time", flush=True)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                group = pending.pop(0)
                part = os.path.join(work, f"check-{group}.json")
                logs[group] = open(os.path.join(work, f"check-{group}.log"), "w")
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.gpu_check",
                    "check",
                    "--group",
                    group,
                    "--size",
                    size,
                    "--json",
                    part,
                ]
                running[group] = subprocess.Popen(cmd, stdout=logs[group], stderr=subprocess.STDOUT)
            for group, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[group]
                    logs[group].close()
                    print(
                        f"gpu_check: group {group} done (exit {proc.returncode}, "
                        f"{time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )
            time.sleep(0.2)
    except KeyboardInterrupt:  # timeout -s INT: keep what the groups wrote
        print("gpu_check: interrupted; collecting the finished cases", flush=True)
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    finished = [g for g in groups if g not in running and g not in pending]
    results: list[dict[str, Any]] = []
    for group in groups:
        part = os.path.join(work, f"check-{group}.json")
        if os.path.exists(part):
            with open(part) as fh:
                results.extend(json.load(fh)["results"])
    summary = summarise(results, groups, finished)
    payload = {
        "environment": _environment(device),
        "size": size,
        "seconds": time.perf_counter() - t0,
        "summary": summary,
        "results": results,
    }
    write_json(args.json, payload)
    print(render_table(results), flush=True)
    print(f"gpu_check: {summary['verdict']} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return 0 if summary["ok"] else 1


def render_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per case: status, name, worst tensor against its limit."""
    lines = []
    for r in results:
        status = "PASS" if r.get("ok") else ("ERROR" if r.get("error") else "FAIL")
        if r.get("error"):
            lines.append(f"{status:5} {r['name']}: {r['error']}")
            continue
        tensors = r.get("tensors") or []
        if not tensors:
            lines.append(f"{status:5} {r['name']}: nothing compared")
            continue
        worst = max(tensors, key=lambda t: t["fused"] / t["limit"] if t["limit"] > 0 else math.inf)
        lines.append(
            f"{status:5} {r['name']}: worst {worst['name']} {worst['fused']:.2e} (limit {worst['limit']:.2e})"
        )
    return "\n".join(lines)
