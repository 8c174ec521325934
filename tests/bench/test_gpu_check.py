"""The correctness driver of bench/run_gpu.sh: its criterion, its case lists and its verdict."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from bench import gpu_check


def test_errors_are_relative_to_the_largest_magnitude_and_non_finite_is_inf():
    want = torch.tensor([4.0, -2.0, 1.0])
    assert gpu_check.max_rel_error(want + torch.tensor([0.0, 0.4, 0.0]), want) == pytest.approx(0.1)
    assert gpu_check.max_rel_error(torch.tensor([4.0, float("nan"), 1.0]), want) == math.inf
    assert gpu_check.rel_l2_error(want, want) == 0.0


def test_compare_fails_a_wrong_result_and_passes_a_rounded_one():
    oracle = torch.randn(64, 32, dtype=torch.float64)
    reference = oracle.to(torch.bfloat16)
    assert gpu_check.compare("out", oracle.to(torch.bfloat16), reference, oracle, torch.bfloat16).ok
    wrong = (oracle * 1.1).to(torch.bfloat16)
    assert not gpu_check.compare("out", wrong, reference, oracle, torch.bfloat16).ok


def test_full_cases_cover_vit_b_and_llm_shapes_ragged_ranks_and_both_noise_settings():
    cases = gpu_check.op_cases("lora_mul", "bf16", "full")
    dims = {(c.in_features, c.out_features) for c in cases}
    assert {(768, 2304), (768, 768), (768, 3072), (3072, 768), (4096, 4096)} <= dims
    assert {c.samples * c.tokens for c in cases if c.shape.startswith("vitb")} == {2 * 64 * 197}
    assert any(c.tokens == 2048 for c in cases) and any(c.shape == "llm-ragged" for c in cases)
    assert {c.rank for c in cases if c.shape == "ragged"} == {1, 18, 64}
    assert {c.noise for c in cases} == {"sample", "none"}
    pacelinear = gpu_check.op_cases("pacelinear", "fp16", "full")
    assert {c.op for c in pacelinear} == {"rlrr", "lora_mul_vpt_add"}
    groups = gpu_check.group_names("full")
    assert groups[0] == "model" and {"lora_add-bf16", "lora_add-fp16", "pacelinear-bf16"} <= set(groups)


def test_a_functional_case_passes_through_the_kernels():
    case = gpu_check.OpCase("lora_mul", "tiny", 2, 5, 24, 40, 3, "sample", "fp32")
    result = gpu_check.run_functional_case(case, "cpu")
    assert result.ok, result.summary()
    assert [t.name for t in result.tensors] == ["out", "dx", "dlora_a", "dlora_b", "ddelta_bias"]


def test_summary_fails_on_a_failed_case_and_on_an_unfinished_group():
    ok = {"ok": True, "error": None}
    assert gpu_check.summarise([ok, ok], ["a", "b"], ["a", "b"])["ok"]
    failed = gpu_check.summarise([ok, {"ok": False, "error": None}], ["a"], ["a"])
    assert not failed["ok"] and failed["verdict"] == "FAIL: 1/2 cases passed, 1 failed"
    cut = gpu_check.summarise([ok], ["a", "b"], ["a"])
    assert not cut["ok"] and cut["verdict"] == "INCOMPLETE: 1/1 cases passed; groups not finished: b"
    assert not gpu_check.summarise([], ["a"], ["a"])["ok"]


def test_the_launch_driver_finds_every_kernel_of_both_op_families():
    # The kernels moved into pace_kernels.lora_*.kernels once; the driver then found none and could
    # no longer name a kernel that the sanitizer runs never launched.
    import pace_kernels.lora_add.kernels as add_kernels
    import pace_kernels.lora_mul.kernels as mul_kernels

    defined = {
        name
        for module in (add_kernels, mul_kernels)
        for name in re.findall(r"^@triton\.jit\ndef (\w+)", inspect.getsource(module), re.MULTILINE)
    }
    assert len(defined) == 8
    assert set(gpu_check.launched_kernels()) == defined


def test_a_pacelinear_case_does_not_depend_on_the_global_rng():
    # The frozen weight was drawn from the global RNG, which torch seeds afresh in every process:
    # the first case of each pacelinear group reported different errors from run to run.
    case = gpu_check.OpCase("rlrr", "tiny", 2, 5, 24, 40, 1, "sample", "fp32")
    errors = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        errors.append([t.fused for t in gpu_check.run_pacelinear_case(case, "cpu").tensors])
    assert errors[0] == errors[1]
