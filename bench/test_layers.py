"""Layer benchmarks: one pytest-benchmark group per (shape, op, noise, pass, dtype), contenders side by side.

Within a group the ``floor`` runs first; later contenders record their ratio to it in
``extra_info``. :mod:`bench.report` recomputes every ratio from the medians in the JSON, so a group
run without its floor (``-k``) still reports what it can.
"""

from __future__ import annotations

import pytest
import torch

from bench import specs
from bench.contenders import (
    BUILDERS,
    ContenderUnavailable,
    fused_unavailable_reason,
    make_case,
    make_pass,
    oracle_output,
)

# group -> (floor seconds, floor seconds at the two-GEMM count or None)
_FLOORS: dict[str, tuple[float, object]] = {}

# Relative L2 error a contender's forward may have against the fp32 oracle before its timing is
# refused (a contender that computes something else must not produce a number).
_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# Shapes in the order they run: a wide, an LLM and a tall layer first, so a GPU run cut short by its
# time budget (bench/run_gpu.sh) still covers each kind of shape.
_SHAPE_PRIORITY = ("vitb-qkv", "llm-4096", "vitb-fc2", "vitb-fc1", "vitb-proj", "llm-11008", "vitl-fc1")


def _cases() -> list:
    params = []
    order = {name: i for i, name in enumerate(_SHAPE_PRIORITY)}
    for shape in sorted(specs.shapes(), key=lambda s: order.get(s.name, len(order))):
        for op in specs.OPS:
            for dtype in specs.dtypes():
                for pass_ in specs.PASSES:
                    for contender in specs.CONTENDERS:
                        ident = f"{shape.name}-{op.name}-{specs.DTYPE_NAMES[dtype]}-{pass_}-{contender}"
                        params.append(pytest.param(shape, op, dtype, pass_, contender, id=ident))
    return params


@pytest.mark.parametrize("shape,op,dtype,pass_,contender", _cases())
def test_layer(benchmark, timing, bench_device, shape, op, dtype, pass_, contender):
    group = specs.group_name(shape, op, pass_, dtype)
    benchmark.group = group
    if contender == "fused":
        reason = fused_unavailable_reason(op, bench_device)
        if reason:
            pytest.skip(reason)

    case = make_case(op, shape, dtype, bench_device)
    try:
        forward, grad_inputs = BUILDERS[contender](case)
    except ContenderUnavailable as exc:
        pytest.skip(str(exc))

    run = make_pass(forward, grad_inputs, case.grad_out, pass_)
    try:
        # The first calls, untimed: compilation and autotuning happen here. The forward runs with
        # autograd on, as timed, so torch.compile builds the graph it is timed with and no other.
        if contender != "floor" and pass_ == "fwd":
            got = forward().detach().float()
            want = oracle_output(case)
            err = ((got - want).norm() / want.norm()).item()
            assert err < _TOLERANCE[dtype], f"{contender} disagrees with the reference: rel. error {err:.2e}"
        else:
            run()
    except NotImplementedError as exc:  # e.g. a backend that refuses this dtype or layout
        pytest.skip(f"{contender}: {exc}")

    median = timing.run(benchmark, run)
    memory = timing.memory

    ge = specs.gemm_equiv(op, shape, pass_)
    tge = specs.two_gemm_equiv(op, shape, pass_)
    per_gemm = specs.flops_per_gemm(shape)
    info = {
        "kind": "layer",
        "contender": contender,
        "shape": shape.name,
        "samples": shape.samples,
        "tokens": shape.tokens,
        "n_rows": shape.n_rows,
        "in_features": shape.in_features,
        "out_features": shape.out_features,
        "op": op.kind,
        "rank": op.rank,
        "noise": op.noise,
        "pass": pass_,
        "dtype": specs.DTYPE_NAMES[dtype],
        "device": bench_device,
        "gemm_equiv": ge,
        "gemm_equiv_two_gemm": tge,
        "flops": ge * per_gemm,
        "time_median_s": median,
        **memory,
    }
    if median is None:
        benchmark.extra_info.update(info)
        return
    if contender == "floor":
        lin = specs.linear_gemm_equiv(pass_)
        floor = median * ge / lin
        floor_two = None if tge is None else median * tge / lin
        _FLOORS[group] = (floor, floor_two)
        info.update(
            linear_gemm_equiv=lin,
            linear_time_s=median,
            floor_time_s=floor,
            floor_two_gemm_time_s=floor_two,
            tflops=lin * per_gemm / median / 1e12,
            ratio_to_floor=1.0,
        )
    else:
        floor, floor_two = _FLOORS.get(group, (None, None))
        info.update(
            floor_time_s=floor,
            tflops=ge * per_gemm / median / 1e12,
            ratio_to_floor=None if floor is None else median / floor,
            ratio_to_two_gemm=None if floor_two is None else median / floor_two,
        )
    benchmark.extra_info.update(info)
