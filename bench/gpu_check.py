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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

if not torch.cuda.is_available():  # must precede the first import of triton (docs/design.md section 7)
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Allowed error floor, relative to the largest magnitude of the float64 result (the kernel tests').
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# A model step is a deep composition: its floor is the one-layer floor times this.
MODEL_FLOOR_FACTOR = 2.0
# Gradient checkpointing must not change fp32 gradients beyond this (issue 10, item 1).
CHECKPOINT_TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# Error measures


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64; inf when ``got`` holds a non-finite value."""
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return math.inf
    scale = want64.abs().max().item() if want64.numel() else 0.0
    diff = (got64 - want64).abs().max().item() if want64.numel() else 0.0
    return diff / scale if scale > 0 else diff


def rel_l2_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return math.inf
    norm = want64.norm().item()
    diff = (got64 - want64).norm().item()
    return diff / norm if norm > 0 else diff


def allowed_error(reference_error: float, dtype: torch.dtype, factor: float = 1.0) -> float:
    """The kernel tests' criterion: twice the same-dtype reference's error plus the dtype's floor."""
    return 2.0 * reference_error + factor * FLOOR[dtype]


@dataclass
class TensorResult:
    """One compared tensor (the output or a gradient) of one case."""

    name: str
    fused: float  # max-relative error of the fused path against float64
    reference: float  # the same for the reference run in the case's dtype
    limit: float
    fused_rel_l2: float

    @property
    def ok(self) -> bool:
        return self.fused <= self.limit


def compare(
    name: str,
    fused: torch.Tensor,
    reference: torch.Tensor,
    oracle: torch.Tensor,
    dtype: torch.dtype,
    factor: float = 1.0,
) -> TensorResult:
    ref_err = max_rel_error(reference, oracle)
    return TensorResult(
        name,
        max_rel_error(fused, oracle),
        ref_err,
        allowed_error(ref_err, dtype, factor),
        rel_l2_error(fused, oracle),
    )


@dataclass
class CaseResult:
    group: str
    name: str
    seconds: float = 0.0
    tensors: list[TensorResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.tensors) and all(t.ok for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        for t, obj in zip(self.tensors, out["tensors"]):
            obj["ok"] = t.ok
        return out

    def summary(self) -> str:
        status = "PASS" if self.ok else ("ERROR" if self.error else "FAIL")
        if self.error:
            return f"{status}  {self.name}: {self.error}"
        worst = max(self.tensors, key=lambda t: t.fused / t.limit if t.limit > 0 else math.inf)
        return (
            f"{status}  {self.name}: worst {worst.name} {worst.fused:.2e} (limit {worst.limit:.2e}, "
            f"reference {worst.reference:.2e}) [{self.seconds:.1f}s]"
        )


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class OpCase:
    """One fused op at one shape: ``samples x tokens`` rows of ``in_features -> out_features``."""

    op: str  # "lora_add" | "lora_mul" | "rlrr" | "lora_mul_vpt_add" (the last two through PaceLinear)
    shape: str
    samples: int
    tokens: int
    in_features: int
    out_features: int
    rank: int
    noise: str  # "sample" | "none"
    dtype: str

    @property
    def name(self) -> str:
        rows = self.samples * self.tokens
        return (
            f"{self.op} r{self.rank} {self.noise} {self.shape} "
            f"{rows}x{self.in_features}->{self.out_features} {self.dtype}"
        )


_VIT_ROWS = (2 * 64, 197)  # PACE's two copies of a batch of 64 ViT-B/16 images
FULL_SHAPES = (
    ("vitb-qkv", *_VIT_ROWS, 768, 2304),
    ("vitb-proj", *_VIT_ROWS, 768, 768),
    ("vitb-fc1", *_VIT_ROWS, 768, 3072),
    ("vitb-fc2", *_VIT_ROWS, 3072, 768),
    ("llm-4096", 2, 2048, 4096, 4096),
    ("llm-ragged", 2, 2047, 4091, 4101),
)
RAGGED_SHAPE = ("ragged", 3, 197, 203, 301)
SMALL_SHAPES = (("tiny", 2, 5, 24, 40), ("tiny-t1", 3, 1, 17, 20))
OPS = ("lora_add", "lora_mul", "pacelinear")


def op_cases(group_op: str, dtype: str, size: str) -> list[OpCase]:
    """The cases of one group: ``group_op`` is ``lora_add``, ``lora_mul`` or ``pacelinear``."""
    if size == "full":
        shapes = FULL_SHAPES if dtype != "fp32" else (FULL_SHAPES[0],)
        ragged_ranks = (1, 18, 64)
    else:
        shapes, ragged_ranks = SMALL_SHAPES, (1, 18)
    cases: list[OpCase] = []

    def add(op: str, shape: tuple, rank: int, noise: str) -> None:
        cases.append(OpCase(op, shape[0], *shape[1:], rank, noise, dtype))

    rank_by_op = {"lora_add": 8, "lora_mul": 10, "lora_mul_vpt_add": 10, "rlrr": 1}
    for shape in shapes:
        if group_op == "pacelinear":
            add("lora_mul_vpt_add", shape, rank_by_op["lora_mul_vpt_add"], "sample")
            add("rlrr", shape, 1, "sample")
        else:
            add(group_op, shape, rank_by_op[group_op], "sample")
            add(group_op, shape, rank_by_op[group_op], "none")
    if group_op != "pacelinear" and size == "full":
        for rank in ragged_ranks:
            add(group_op, RAGGED_SHAPE, rank, "sample")
        add(group_op, RAGGED_SHAPE, 18, "none")
    elif group_op != "pacelinear":
        for rank in ragged_ranks:
            add(group_op, shapes[0], rank, "sample")
    return cases


def _generator(name: str, device: str) -> torch.Generator:
    """A generator on ``device`` (drawing ViT-sized inputs on the CPU would take seconds per case),
    seeded from the case's name."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))


def _randn(gen: torch.Generator, *size: int, scale: float = 1.0, device: str) -> torch.Tensor:
    return torch.randn(*size, generator=gen, dtype=torch.float64, device=device) * scale


def _grads(y: torch.Tensor, leaves: Sequence[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, leaves, grad_out.to(y.dtype)))


def run_functional_case(case: OpCase, device: str) -> CaseResult:
    """``pace_kernels.lora_*_linear`` with ``backend="triton"`` vs ``"torch"`` vs float64."""
    import pace_kernels

    dtype = DTYPES[case.dtype]
    gen = _generator(case.name, device)
    s, t, k, d, r = case.samples, case.tokens, case.in_features, case.out_features, case.rank
    # Factor scales that make the adapter term as large as the frozen one (lora_mul: M ~ 0.5).
    master = {
        "x": _randn(gen, s, t, k, device=device),
        "weight": _randn(gen, d, k, scale=k**-0.5, device=device),
        "bias": _randn(gen, d, scale=0.1, device=device),
        "lora_a": _randn(gen, r, k, scale=(k**-0.5 if case.op == "lora_add" else r**-0.5), device=device),
        "lora_b": _randn(gen, d, r, scale=0.5, device=device),
        "delta_bias": _randn(gen, d, scale=0.1, device=device),
    }
    noise = None
    if case.noise == "sample":  # drawn in fp32 as PaceLinear draws it
        noise = 1.0 + 0.5 * torch.randn(s, d, generator=gen, device=device)
    grad_out = _randn(gen, s, t, d, device=device)
    fn = pace_kernels.lora_add_linear if case.op == "lora_add" else pace_kernels.lora_mul_linear
    trainable = ("x", "lora_a", "lora_b", "delta_bias")

    def run(backend: str, run_dtype: torch.dtype) -> list[torch.Tensor]:
        args = {n: v.to(run_dtype).requires_grad_(n in trainable) for n, v in master.items()}
        z = None if noise is None else (noise.double() if run_dtype == torch.float64 else noise)
        y = fn(
            args["x"],
            args["weight"],
            args["bias"],
            args["lora_a"],
            args["lora_b"],
            args["delta_bias"],
            z,
            backend=backend,
        )
        return [y.detach(), *_grads(y, [args[n] for n in trainable], grad_out)]

    oracle = run("torch", torch.float64)
    reference = run("torch", dtype)
    fused = run("triton", dtype)
    names = ("out", *("d" + n for n in trainable))
    result = CaseResult(f"{case.op}-{case.dtype}", case.name)
    result.tensors = [compare(n, f, ref, o, dtype) for n, f, ref, o in zip(names, fused, reference, oracle)]
    return result


def _randomise_adapter(layer: torch.nn.Module, gen: torch.Generator) -> None:
    """Nonzero adapter tensors (PACE's init has B = 0 and P_d = 0, which would hide their paths)."""
    with torch.no_grad():
        for p in layer.parameters():
            if not p.requires_grad:
                continue
            scale = 0.5 if p.ndim < 2 else 0.5 / math.sqrt(min(p.shape))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64, device=gen.device).to(p) * scale)


def run_pacelinear_case(case: OpCase, device: str) -> CaseResult:
    """:class:`pace.PaceLinear` (``rlrr`` or ``lora_mul_vpt_add``, sigma 0.5, train mode) with the
    fused kernels vs the reference, the noise drawn from the same seed."""
    import pace

    dtype = DTYPES[case.dtype]
    gen = _generator(case.name, device)
    s, t, k, d = case.samples, case.tokens, case.in_features, case.out_features
    base = pace.PaceLinear(
        k, d, adapter=case.op, rank=case.rank, sigma=0.5, backend="torch", device=device, dtype=torch.float64
    )
    _randomise_adapter(base, gen)
    base.train()
    x64 = _randn(gen, s, t, k, device=device)
    grad_out = _randn(gen, s, t, d, device=device)

    def run(backend: str, run_dtype: torch.dtype) -> list[torch.Tensor]:
        layer = copy.deepcopy(base).to(run_dtype)
        layer.backend = backend
        x = x64.to(run_dtype).requires_grad_(True)
        params = layer.adapter_parameters()
        torch.manual_seed(1234)  # the same noise for every run
        y = layer(x)
        return [y.detach(), *_grads(y, [x, *params.values()], grad_out)]

    names = ["out", "dx", *("d" + n for n in base.adapter_parameters())]
    oracle = run("torch", torch.float64)
    reference = run("torch", dtype)
    fused = run("triton", dtype)
    result = CaseResult(f"pacelinear-{case.dtype}", case.name)
    result.tensors = [compare(n, f, ref, o, dtype) for n, f, ref, o in zip(names, fused, reference, oracle)]
    return result


# --------------------------------------------------------------------------------------------------
# Model step with gradient checkpointing


@dataclass(frozen=True)
class ModelCheckConfig:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    batch: int


def model_check_config(size: str) -> ModelCheckConfig:
    if size == "full":  # ViT-B width, 4 blocks, PACE's two copies of 8 images: 16 x 197 rows
        return ModelCheckConfig(224, 16, 768, 4, 12, 8)
    return ModelCheckConfig(32, 8, 48, 2, 3, 2)


def _vit(cfg: ModelCheckConfig, device: str) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    import pace

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=10,
        drop_path_rate=0.3,
    )
    pace.inject(model, adapter="lora_mul_vpt_add", rank=10, sigma=0.8, backend="torch")
    gen = torch.Generator().manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, pace.PaceLinear) and layer.adapter != "head":
            _randomise_adapter(layer, gen)
    return model.to(device).train()


def _pace_step_grads(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    backend: str,
    checkpointing: bool,
    autocast: bool,
) -> list[torch.Tensor]:
    import pace

    pace.set_backend(model, backend)
    model.set_grad_checkpointing(checkpointing)
    params = pace.trainable_parameters(model)
    crit = pace.PaceCriterion(mode="pace", lam=1.0)
    torch.manual_seed(4321)  # the same DropPath masks and noise for every run
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = crit(model, x, y)
    grads = torch.autograd.grad(out.loss, params)
    model.set_grad_checkpointing(False)
    return [out.loss.detach().float().reshape(1), *(g.float() for g in grads)]


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _step_result(
    name: str,
    got: list[torch.Tensor],
    oracle: list[torch.Tensor],
    dtype: torch.dtype,
    reference: list[torch.Tensor] | None = None,
    limit: float | None = None,
) -> CaseResult:
    """Loss (max-relative) and all gradients (one flattened vector, rel. L2) of a step against
    ``oracle``: within ``limit``, or within the op criterion against ``reference``'s own error."""
    res = CaseResult("model", name)
    for label, pick in (("loss", lambda v: v[0]), ("grads (rel. L2)", lambda v: _flat(v[1:]))):
        measure = max_rel_error if label == "loss" else rel_l2_error
        err = measure(pick(got), pick(oracle))
        ref_err = 0.0 if reference is None else measure(pick(reference), pick(oracle))
        lim = limit if limit is not None else allowed_error(ref_err, dtype, MODEL_FLOOR_FACTOR)
        res.tensors.append(TensorResult(label, err, ref_err, lim, rel_l2_error(pick(got), pick(oracle))))
    return res


def run_model_checks(size: str, device: str) -> Iterator[CaseResult]:
    """One PACE step of a timm ViT (``lora_mul_vpt_add``, sigma 0.8, DropPath 0.3) with and without
    ``set_grad_checkpointing``, reference and fused: the loss and the gradients of every trainable
    tensor. Checkpointing must not change the gradients (issue 10 item 1, reference and fused);
    the fused step must match the reference (fp32, and bf16 autocast against fp32). Each result is
    yielded as soon as its steps have run, so a run stopped by its budget keeps the earlier ones."""
    cfg = model_check_config(size)
    model = _vit(cfg, device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, 10, (cfg.batch,), generator=gen).to(device)
    label = f"ViT d{cfg.embed_dim} depth {cfg.depth} b{cfg.batch} {cfg.img_size}px lora_mul_vpt_add pace"
    f32 = torch.float32
    clock = [time.perf_counter()]

    def grads(backend: str, ckpt: bool, amp: bool = False) -> list[torch.Tensor]:
        return _pace_step_grads(model, x, y, backend=backend, checkpointing=ckpt, autocast=amp)

    def timed(res: CaseResult) -> CaseResult:
        now = time.perf_counter()
        res.seconds, clock[0] = now - clock[0], now
        return res

    ref = grads("torch", False)
    ref_ckpt = grads("torch", True)
    yield timed(
        _step_result(
            f"{label} fp32: reference, checkpointing changes nothing (issue 10 item 1)",
            ref_ckpt,
            ref,
            f32,
            limit=CHECKPOINT_TOL,
        )
    )
    fused = grads("triton", False)
    yield timed(_step_result(f"{label} fp32: fused = reference", fused, ref, f32))
    fused_ckpt = grads("triton", True)
    yield timed(
        _step_result(
            f"{label} fp32: fused, checkpointing changes nothing (issue 10 item 1)",
            fused_ckpt,
            fused,
            f32,
            limit=CHECKPOINT_TOL,
        )
    )
    yield timed(
        _step_result(
            f"{label} fp32: fused with checkpointing = reference with checkpointing",
            fused_ckpt,
            ref_ckpt,
            f32,
        )
    )
    ref_amp = grads("torch", True, amp=True)
    fused_amp = grads("triton", True, amp=True)
    yield timed(
        _step_result(
            f"{label} bf16 autocast, checkpointing: fused vs fp32 reference",
            fused_amp,
            ref_ckpt,
            torch.bfloat16,
            reference=ref_amp,
        )
    )


# --------------------------------------------------------------------------------------------------
# Groups, workers and the parallel driver


def group_names(size: str) -> list[str]:
    dtypes = ("bf16", "fp16", "fp32") if size == "full" else ("fp32", "bf16")
    # The model group first: it is the longest.
    return ["model", *(f"{op}-{dt}" for dt in dtypes for op in OPS)]


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def run_group(group: str, size: str, device: str, json_path: str | None) -> list[CaseResult]:
    """Run one group's cases one after another, writing the results after each."""
    results: list[CaseResult] = []

    def record(res: CaseResult) -> None:
        results.append(res)
        print(res.summary(), flush=True)
        _write_json(json_path, {"group": group, "results": [r.to_json() for r in results]})

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
    _write_json(args.json, payload)
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


# --------------------------------------------------------------------------------------------------
# The compute-sanitizer driver


@dataclass(frozen=True)
class LaunchCase:
    op: str  # "lora_add" | "lora_mul"
    samples: int
    tokens: int
    in_features: int
    out_features: int
    rank: int
    noise: str  # "sample" | "token" | "none"
    input_grad: bool


def launch_cases(subset: str) -> list[LaunchCase]:
    """Ragged shapes that reach every launch path: per-sample segments (T = 197) and gathered noise
    rows (T = 1, per-token), input gradient or not (lora_add's one-program-per-row-tile backward),
    few rows (one dM split) and > 2048 rows over a small [D, K] (several dM splits)."""
    cases = []
    for op in ("lora_add", "lora_mul"):
        cases += [
            LaunchCase(op, 2, 197, 203, 301, 10, "sample", True),
            LaunchCase(op, 2, 197, 203, 301, 10, "none", True),
        ]
        if subset == "all":
            cases += [
                LaunchCase(op, 2, 197, 203, 301, 10, "sample", False),
                LaunchCase(op, 5, 1, 203, 301, 18, "token", True),
                LaunchCase(op, 12, 197, 130, 150, 1, "sample", True),
                LaunchCase(op, 3, 45, 77, 93, 64, "sample", True),
            ]
    return cases


def launch_once(case: LaunchCase, dtype: torch.dtype, device: str) -> None:
    import pace_kernels

    gen = torch.Generator().manual_seed(0)
    s, t, k, d, r = case.samples, case.tokens, case.in_features, case.out_features, case.rank

    def rand(*size: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    x = rand(s, t, k, grad=case.input_grad)
    weight, bias = rand(d, k, scale=k**-0.5), rand(d, scale=0.1)
    lora_a, lora_b, db = (
        rand(r, k, scale=k**-0.5, grad=True),
        rand(d, r, scale=0.1, grad=True),
        rand(d, scale=0.1, grad=True),
    )
    noise = None
    if case.noise == "sample":
        noise = (1.0 + 0.5 * torch.randn(s, d, generator=gen)).to(device)
    elif case.noise == "token":
        noise = (1.0 + 0.5 * torch.randn(s, t, d, generator=gen)).to(device)
    fn = pace_kernels.lora_add_linear if case.op == "lora_add" else pace_kernels.lora_mul_linear
    y = fn(x, weight, bias, lora_a, lora_b, db, noise, backend="triton")
    leaves = [v for v in (x, lora_a, lora_b, db) if v.requires_grad]
    torch.autograd.grad(y, leaves, torch.randn_like(y))
    if device == "cuda":
        torch.cuda.synchronize()


def launched_kernels() -> dict[str, int | None]:
    """Every Triton kernel object of the kernel modules by name, with how many binaries it compiled
    for the device (None where this Triton keeps no per-device cache, e.g. in the interpreter)."""
    import importlib

    from triton.runtime.autotuner import Autotuner, Heuristics

    counts: dict[str, int | None] = {}

    def visit(obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for value in obj.values():
                visit(value, seen)
            return
        if isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, seen)
            return
        fn = obj
        while isinstance(fn, (Autotuner, Heuristics)):
            fn = fn.fn
        if not hasattr(fn, "arg_names") or not hasattr(fn, "fn"):
            return
        name = getattr(fn.fn, "__name__", repr(fn))
        caches = getattr(fn, "device_caches", None)
        n = None
        if caches is not None:
            n = sum(len(entry[0]) for entry in list(caches.values()) if entry and isinstance(entry[0], dict))
        previous = counts.get(name)
        counts[name] = n if previous is None else previous + (n or 0)

    seen: set[int] = set()
    for module_name in ("pace_kernels.lora_add", "pace_kernels.lora_mul"):
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            visit(value, seen)
    return counts


def launch_main(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [DTYPES[name] for name in args.dtypes.split(",") if name]
    t0 = time.perf_counter()
    failures = []
    for dtype in dtypes:
        for case in launch_cases(args.subset):
            label = f"{case} {dtype}"
            try:
                launch_once(case, dtype, device)
                print(f"launched {label}", flush=True)
            except Exception as exc:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"FAILED {failures[-1]}", flush=True)
    kernels = launched_kernels()
    never = sorted(n for n, c in kernels.items() if c == 0)
    print(f"kernels compiled for the device: {json.dumps(kernels, sort_keys=True)}", flush=True)
    if never:
        print(f"kernels never launched by this driver: {', '.join(never)}", flush=True)
    _write_json(
        args.json,
        {
            "device": device,
            "subset": args.subset,
            "dtypes": args.dtypes,
            "failures": failures,
            "kernels": kernels,
            "never_launched": never,
            "seconds": time.perf_counter() - t0,
        },
    )
    return 1 if failures else 0


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


if __name__ == "__main__":
    sys.exit(main())
