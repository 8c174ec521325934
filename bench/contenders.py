"""The contenders of the layer benchmarks, each built on one shared :class:`Case`.

* ``floor``: the frozen ``nn.Linear`` alone (forward, plus the input gradient for fwd+bwd). Its time,
  scaled by the op's GEMM-equivalent count (:func:`bench.specs.gemm_equiv`), is the bound we chase.
* ``reference``: eager PyTorch written the way the public PACE code writes its adapters: the frozen
  linear and the adapter as separate ``F.linear`` calls, ``lora_mul``'s weight ``W0 * (B A)``
  materialised every call, the noise applied by an elementwise multiply, and the noise-free
  ``lora_mul`` run as one linear with the merged weight ``W0 * (1 + B A)``.
* ``compiled``: ``torch.compile`` of ``reference`` (default mode, static shapes).
* ``peft``: PEFT's own layers: LoRA's ``Linear`` (with ``lora_bias`` for ``delta b``) for
  ``lora_add``, the noise multiplied onto its ``lora_B`` output by a forward hook; HiRA's ``Linear``
  (``W0 + W0 * (B A)``) for ``lora_mul``, with ``delta b`` and the noise applied to
  its adapter term by hooks, as the reference applies them.
* ``fused``: ``pace_kernels.lora_*_linear(..., backend="triton")``; CUDA only.

Every contender returns a zero-argument ``forward()`` and the tensors its gradients are taken for
(the input and the adapter's trainable tensors), so the fwd+bwd pass is the same
``torch.autograd.grad`` call for all of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .specs import Op, Shape

Forward = Callable[[], torch.Tensor]


class ContenderUnavailable(Exception):
    """Raised with the reason when a contender cannot run here (the test skips with that reason)."""


@dataclass
class Case:
    """The tensors of one benchmark group, shared by its contenders."""

    op: Op
    shape: Shape
    x: torch.Tensor  # [B, T, K], requires grad
    weight: torch.Tensor  # [D, K], frozen
    bias: torch.Tensor  # [D], frozen
    lora_a: torch.Tensor  # [r, K]
    lora_b: torch.Tensor  # [D, r]
    delta_bias: torch.Tensor  # [D]
    noise: torch.Tensor | None  # [B, D] per sample, or None
    grad_out: torch.Tensor  # [B, T, D]

    @property
    def noise_bcast(self) -> torch.Tensor | None:
        """The noise as ``[B, 1, D]``, the layout in which the public code draws it."""
        return None if self.noise is None else self.noise.unsqueeze(1)

    def trainable(self) -> list[torch.Tensor]:
        return [self.x, self.lora_a, self.lora_b, self.delta_bias]


def make_case(op: Op, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k, d, r = shape.in_features, shape.out_features, op.rank

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    # Nonzero B so the adapter path carries real values (B = 0 at init would let a kernel skip work).
    x = rand(shape.samples, shape.tokens, k).requires_grad_(True)
    weight = rand(d, k, scale=k**-0.5)
    bias = rand(d, scale=0.1)
    lora_a = rand(r, k, scale=k**-0.5).requires_grad_(True)
    lora_b = rand(d, r, scale=0.1).requires_grad_(True)
    delta_bias = rand(d, scale=0.1).requires_grad_(True)
    noise = None
    if op.noise == "sample":
        noise = 1.0 + 0.5 * rand(shape.samples, d)
    elif op.noise != "none":
        raise ValueError(f"unknown noise {op.noise!r}")
    grad_out = rand(shape.samples, shape.tokens, d)
    return Case(op, shape, x, weight, bias, lora_a, lora_b, delta_bias, noise, grad_out)


# --- reference: eager, as the public PACE code writes it ------------------------------------------


def reference_lora_add(x, w0, b0, lora_a, lora_b, delta_bias, z):
    h = F.linear(x, w0, b0)
    dh = F.linear(F.linear(x, lora_a), lora_b, delta_bias)
    return h + dh if z is None else h + dh * z


def reference_lora_mul(x, w0, b0, lora_a, lora_b, delta_bias, z):
    h = F.linear(x, w0, b0)
    dh = F.linear(x, w0 * (lora_b @ lora_a), delta_bias)
    return h + dh * z


def reference_lora_mul_merged(x, w0, b0, lora_a, lora_b, delta_bias, z):
    # Noise-free: the public code folds the adapter into the weight and runs one linear.
    return F.linear(x, w0 * (1 + lora_b @ lora_a), b0 + delta_bias)


def reference_fn(op: Op) -> Callable:
    if op.kind == "lora_add":
        return reference_lora_add
    if op.kind == "lora_mul":
        return reference_lora_mul if op.noise != "none" else reference_lora_mul_merged
    raise ValueError(f"unknown op kind {op.kind!r}")


def _args(case: Case) -> tuple:
    return (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.delta_bias, case.noise_bcast)


def build_reference(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    fn, args = reference_fn(case.op), _args(case)
    return (lambda: fn(*args)), case.trainable()


# torch.compile keeps one cache per code object; these are reused across the groups of one
# (op, shape, dtype) so fwd and fwd+bwd share a compilation.
_COMPILED: dict[tuple, Callable] = {}


def build_compiled(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    if not hasattr(torch, "compile"):
        raise ContenderUnavailable("torch.compile is not available in this torch")
    key = (case.op, case.shape, case.x.dtype, case.x.device.type)
    if key not in _COMPILED:
        # A fresh function object per key, so each gets its own dynamo cache and static shapes.
        base = reference_fn(case.op)

        def compiled_reference(*args):
            return base(*args)

        _COMPILED[key] = torch.compile(compiled_reference, dynamic=False)
    fn, args = _COMPILED[key], _args(case)
    return (lambda: fn(*args)), case.trainable()


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ContenderUnavailable(f"peft is not installed ({exc}); pip install 'pace[bench]'") from exc
    return peft


def _peft_layer(case: Case, config) -> nn.Module:
    """PEFT's layer around a frozen ``nn.Linear`` holding the case's ``W0``, ``b0``."""
    import peft

    k, d = case.shape.in_features, case.shape.out_features
    holder = nn.Module()
    holder.lin = nn.Linear(k, d, device=case.x.device, dtype=case.x.dtype)
    layer = peft.get_peft_model(holder, config).base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(case.weight)
        layer.base_layer.bias.copy_(case.bias)
    return layer


def _build_peft_lora(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    peft = _import_peft()
    r = case.op.rank
    try:
        config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["lin"], lora_bias=True)
    except TypeError as exc:  # lora_bias (delta b) arrived in peft 0.14
        raise ContenderUnavailable(f"peft {peft.__version__} lacks lora_bias (needs >= 0.14): {exc}") from exc
    layer = _peft_layer(case, config)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(case.lora_a)
        layer.lora_B["default"].weight.copy_(case.lora_b)
        layer.lora_B["default"].bias.copy_(case.delta_bias)
    layer.to(device=case.x.device, dtype=case.x.dtype)
    z = case.noise_bcast
    if z is not None:
        # lora_B's output is U B^T + db: exactly the adapter term the noise multiplies (scaling is 1).
        layer.lora_B["default"].register_forward_hook(lambda _mod, _inp, out: out * z)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = case.x
    return (lambda: layer(x)), [x, *params]


def _build_peft_hira(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    """PEFT's HiRA layer: ``x W0^T + b0 + x (W0 * (B A))^T``, the ``lora_mul`` weight path. HiRA has no
    bias term, so ``db`` is added, and the noise applied, as the reference applies them: hooks keep
    the frozen layer's output ``h`` and turn HiRA's ``h + dh`` into ``h + z * (dh + db)``."""
    peft = _import_peft()
    if not hasattr(peft, "HiraConfig"):
        raise ContenderUnavailable(f"peft {peft.__version__} has no HiRA (no peft.HiraConfig; 0.21.2 has it)")
    layer = _peft_layer(case, peft.HiraConfig(r=case.op.rank, target_modules=["lin"], hira_dropout=0.0))
    with torch.no_grad():
        layer.hira_A["default"].copy_(case.lora_a)
        layer.hira_B["default"].copy_(case.lora_b)
    layer.to(device=case.x.device, dtype=case.x.dtype)
    delta_bias, z = case.delta_bias, case.noise_bcast
    frozen: dict[str, torch.Tensor] = {}

    def keep_frozen_output(_mod, _inp, out):
        frozen["h"] = out

    def adapter_with_bias_and_noise(_mod, _inp, out):
        h = frozen.pop("h")
        if z is None:
            return out + delta_bias
        return h + (out - h + delta_bias) * z

    layer.base_layer.register_forward_hook(keep_frozen_output)
    layer.register_forward_hook(adapter_with_bias_and_noise)
    x = case.x
    params = [layer.hira_A["default"], layer.hira_B["default"]]
    return (lambda: layer(x)), [x, *params, delta_bias]


def build_peft(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    """PEFT's own layer for the op: LoRA (``lora_bias``) for ``lora_add``, HiRA for ``lora_mul``."""
    if case.op.kind == "lora_add":
        return _build_peft_lora(case)
    if case.op.kind == "lora_mul":
        return _build_peft_hira(case)
    raise ContenderUnavailable(f"no PEFT layer computes {case.op.kind}")


def build_floor(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    k, d = case.shape.in_features, case.shape.out_features
    lin = nn.Linear(k, d, device=case.x.device, dtype=case.x.dtype).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(case.weight)
        lin.bias.copy_(case.bias)
    x = case.x
    return (lambda: lin(x)), [x]


def fused_unavailable_reason(op: Op, device: str) -> str | None:
    """Why the fused contender cannot run here, or None when it can."""
    if device != "cuda":
        return (
            "fused: no CUDA device; the Triton kernels would run in Triton's CPU interpreter, "
            "which is a correctness tool, not a timing"
        )
    module_name = f"pace_kernels.{op.kind}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or triton failing to initialise
        return f"fused: {module_name} is unavailable ({type(exc).__name__}: {exc})"
    if not hasattr(module, "MAX_RANK"):
        return f"fused: {module_name} is not a kernel module (no MAX_RANK)"
    return None


def build_fused(case: Case) -> tuple[Forward, list[torch.Tensor]]:
    reason = fused_unavailable_reason(case.op, case.x.device.type)
    if reason is not None:
        raise ContenderUnavailable(reason)
    import pace_kernels

    fn = pace_kernels.lora_add_linear if case.op.kind == "lora_add" else pace_kernels.lora_mul_linear
    args = (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.delta_bias, case.noise)
    return (lambda: fn(*args, backend="triton")), case.trainable()


BUILDERS: dict[str, Callable[[Case], tuple[Forward, list[torch.Tensor]]]] = {
    "floor": build_floor,
    "reference": build_reference,
    "compiled": build_compiled,
    "peft": build_peft,
    "fused": build_fused,
}


def make_pass(
    forward: Forward, grad_inputs: list[torch.Tensor], grad_out: torch.Tensor, pass_: str
) -> Callable[[], None]:
    """One timed call: the training forward (autograd recording), or forward plus every gradient."""
    if pass_ == "fwd":

        def run() -> None:
            forward()

    elif pass_ == "fwd+bwd":

        def run() -> None:
            torch.autograd.grad(forward(), grad_inputs, grad_out)

    else:
        raise ValueError(f"unknown pass {pass_!r}")
    return run


def oracle_output(case: Case) -> torch.Tensor:
    """The package's reference op (docs/design.md section 3) on the same tensors in fp32: what
    contenders must match."""
    from pace_kernels import reference

    fn = reference.lora_add_linear if case.op.kind == "lora_add" else reference.lora_mul_linear
    f32 = [
        None if t is None else t.detach().float()
        for t in (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.delta_bias, case.noise)
    ]
    with torch.no_grad():
        return fn(*f32)
