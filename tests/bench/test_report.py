"""bench.report renders a small synthetic pytest-benchmark JSON: ratios, targets, memory, skips."""

from __future__ import annotations

import json

import pytest

from bench import report


def _layer(contender, median, *, op="lora_mul", noise="sample", pass_="fwd+bwd", shape="vitb-qkv", mem=None,
           dtype="bf16", tokens=197):
    ge = {("lora_mul", "fwd+bwd"): 3.0, ("lora_mul", "fwd"): 1.0}.get((op, pass_), 2.1)
    return {
        "group": f"layer | {shape} | {op} | {noise} | {pass_} | {dtype}",
        "name": f"test_layer[{shape}-{op}-{noise}-{pass_}-{contender}]",
        "extra_info": {
            "kind": "layer", "contender": contender, "shape": shape, "samples": 128, "tokens": tokens,
            "n_rows": 128 * tokens, "in_features": 768, "out_features": 2304, "op": op,
            "rank": 10 if op == "lora_mul" else 8, "noise": noise, "pass": pass_, "dtype": dtype,
            "gemm_equiv": ge,
            "gemm_equiv_two_gemm": 5.0 if (op, noise, pass_) == ("lora_mul", "sample", "fwd+bwd") else None,
            "peak_mem_extra_bytes": mem,
        },
        "stats": {"median": median, "min": median * 0.9, "mean": median * 1.1},
    }


def _model(mode, contender, median, precision="bf16-autocast"):
    return {
        "group": f"model | vit b64 | {precision} | {mode}",
        "name": f"test_model_step[{precision}-{mode}-{contender}]",
        "extra_info": {"kind": "model", "model": "vit_base_patch16_224", "batch": 64,
                       "adapter": "lora_mul_vpt_add", "rank": 10, "mode": mode, "contender": contender,
                       "precision": precision,
                       "steps_per_call": 2, "images_per_call": 128, "peak_mem_bytes": 3 * 1024**3},
        "stats": {"median": median, "min": median, "mean": median},
    }


def _gpu_run():
    mib = 1024**2
    benches = [
        # noisy lora_mul fwd+bwd: floor = linear 1 ms * 3 / 2 = 1.5 ms
        _layer("floor", 1.0e-3, mem=10 * mib),
        _layer("reference", 6.0e-3, mem=300 * mib),
        _layer("compiled", 3.0e-3, mem=200 * mib),
        _layer("fused", 1.8e-3, mem=40 * mib),
        # noise-free lora_mul fwd+bwd, same shape
        _layer("floor", 1.0e-3, noise="none"),
        _layer("fused", 1.6e-3, noise="none"),
        _layer("compiled", 2.0e-3, noise="none"),
        # lora_add fwd with peft
        _layer("floor", 0.5e-3, op="lora_add", pass_="fwd"),
        _layer("peft", 1.0e-3, op="lora_add", pass_="fwd"),
        _layer("fused", 0.55e-3, op="lora_add", pass_="fwd"),
        _model("baseline", "fused", 0.20),
        _model("pace", "reference", 0.60),
        _model("pace", "fused", 0.30),
        _model("fast", "fused", 0.21),
    ]
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "set": "full", "torch": "2.11.0",
           "command": "pytest bench --benchmark-only"}
    return {"benchmarks": benches, "pace": {"environment": env, "skipped": []}}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_renders_ratios_targets_and_memory(tmp_path):
    text = report.render(report.load([_write(tmp_path, "gpu.json", _gpu_run())]))
    assert "NVIDIA H100 80GB HBM3" in text and "statistic: **median**" in text
    # noisy lora_mul fwd+bwd: fused 1.8 ms / floor 1.5 ms; vs the 5-GEMM floor (2.5 ms); vs reference 6 / 1.8
    row = next(line for line in text.splitlines() if line.startswith("| vitb-qkv") and "1.20×" in line)
    assert "0.72×" in row and "3.33×" in row and "1.67×" in row
    # peft sits in the lora_add table, with fused vs peft = 1.0 / 0.55
    assert "fused vs peft" in text and "1.82×" in text
    # memory in MiB above the inputs
    assert "| vitb-qkv | 10 | 300 | 200 | 40 |" in text
    # targets: noise-free lora_mul fused 1.6/1.5 = 1.07 <= 1.15 met; noisy vs clean fused 1.8/1.6 = 1.12 met;
    # slowest fused vs compiled = 2.0/1.6 = 1.25 < 1.3 missed; model pace 0.6/0.3 = 2x met; fast 1.05 met
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()
             if line.startswith("| ") and ("≤" in line or "≥" in line)}
    assert any("noise-free lora_mul" in k and "1.07×" in v and "met" in v for k, v in lines.items())
    assert any("faster than compiled" in k and "1.25×" in v and "**missed**" in v for k, v in lines.items())
    assert any("PACE step" in k and "2.00×" in v and "met" in v for k, v in lines.items())
    assert any("PACE_fast" in k and "1.05×" in v for k, v in lines.items())
    assert "## Model training step" in text and "426.7" in text  # 128 images / 0.30 s
    assert "| bf16-autocast | pace | fused | 150 | 426.7 | 3.00 | 2.00× | 1.50× |" in text


def test_ratios_only_leaves_out_absolute_numbers(tmp_path):
    text = report.render(report.load([_write(tmp_path, "gpu.json", _gpu_run())]), ratios_only=True)
    assert "floor ms" not in text and "TFLOP/s" not in text and "images/s |" not in text
    assert "| bf16-autocast | pace | fused | 3.00 | 2.00× | 1.50× |" in text


def test_cpu_run_without_fused_merges_files_and_lists_skips(tmp_path):
    run = _gpu_run()
    run["benchmarks"] = [b for b in run["benchmarks"] if b["extra_info"]["contender"] != "fused"
                         and b["extra_info"]["kind"] == "layer"]
    for b in run["benchmarks"]:
        b["extra_info"]["peak_mem_extra_bytes"] = None
    run["pace"]["environment"] = {"device": "cpu", "device_name": "x86_64", "cpu_threads": 2,
                                  "set": "reduced"}
    run["pace"]["skipped"] = [{"nodeid": "a", "reason": "fused: no CUDA device"}]
    half = len(run["benchmarks"]) // 2
    first = {**run, "benchmarks": run["benchmarks"][:half]}
    skip = [{"nodeid": "b", "reason": "fused: no CUDA device"}]
    second = {"benchmarks": run["benchmarks"][half:], "pace": {"skipped": skip}}
    out_md, merged = tmp_path / "out.md", tmp_path / "merged.json"
    assert report.main([_write(tmp_path, "a.json", first), _write(tmp_path, "b.json", second),
                        "-o", str(out_md), "--merge-json", str(merged)]) == 0
    text = out_md.read_text()
    assert "CPU numbers: ratios only" in text and "statistic: **min**" in text
    assert "No fused (Triton) results" in text and "Targets" not in text
    assert "| 2 | fused: no CUDA device |" in text
    assert "not measured on CPU" in text
    # min statistic: reference 5.4 ms / floor (0.9 ms * 3 / 2) = 4.00x
    assert "4.00×" in text
    assert len(json.loads(merged.read_text())["benchmarks"]) == len(run["benchmarks"])


def test_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.load([_write(tmp_path, "bad.json", {"hello": 1})])
