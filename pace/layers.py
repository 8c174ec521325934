"""Drop-in PACE linear layers (docs/design.md section 2) and the SSF scale/shift that RLRR puts after norms.

:class:`PaceLinear` holds the frozen pre-trained ``weight``/``bias`` under the names ``nn.Linear``
uses (code that reads ``layer.weight`` keeps working) and perturbs its adapter's output with
per-sample noise while training. Each adapter kind is a small subclass holding that kind's trainable
tensors (by the names of docs/design.md section 2, which are the saved-adapter format), their init,
its ``delta_bias_vector``, the fused op it calls and its merge; :class:`PaceHead` is the trainable
noisy classifier. ``PaceLinear(..., adapter=kind)`` builds the class registered for ``kind``, as
``pathlib.Path(...)`` builds the path class of the running system. The heavy lifting is done by
:mod:`pace_kernels` (fused Triton kernels on CUDA, the reference elsewhere).
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

import pace_kernels

from .config import ADAPTER_KINDS, DEFAULT_ADAPTER, check_layer_options, check_positive_int, check_sigma
from .noise import draw_noise

__all__ = [
    "ADAPTER_KINDS",
    "PaceLinear",
    "PaceHead",
    "LoraAddLinear",
    "LoraMulLinear",
    "VptAddLinear",
    "LoraMulVptAddLinear",
    "RlrrLinear",
    "SSFNorm",
    "layer_class",
]

_LAYER_CLASSES: Dict[str, Type[PaceLinear]] = {}


def _registered(cls: Type[PaceLinear]) -> Type[PaceLinear]:
    """Record ``cls`` as the layer class of its ``adapter`` name."""
    _LAYER_CLASSES[cls.adapter] = cls
    return cls


def layer_class(adapter: str) -> Type[PaceLinear]:
    """The :class:`PaceLinear` subclass of an adapter kind (or of ``"head"``: :class:`PaceHead`)."""
    if not isinstance(adapter, str) or adapter not in _LAYER_CLASSES:
        raise ValueError(f"adapter must be one of {tuple(_LAYER_CLASSES)}, got {adapter!r}")
    return _LAYER_CLASSES[adapter]


class PaceLinear(nn.Module):
    """``nn.Linear`` with a frozen pre-trained layer, one adapter and PACE noise.

    ``Y = x W0^T + b0 + z * dh(x)`` with ``z ~ N(1, sigma^2)`` drawn per (sample, output channel)
    while training (``noise_shape="token"``: per token), none in eval or when ``sigma == 0``.
    ``adapter`` picks the kind (:data:`ADAPTER_KINDS`, default ``"lora_mul_vpt_add"``; ``"head"``:
    :class:`PaceHead`, the whole layer trainable with a noisy output ``z * (x W^T + b)``).

    Ablations of the PACE paper: ``noise="dropout"`` (Bernoulli noise of the same mean and
    variance), ``noise="additive"`` (``dh + e``, ``e ~ N(0, sigma^2)``), ``noise_on="output"`` (the
    noise scales the whole output ``h + dh`` rather than ``dh``).

    A "sample" is one entry of ``x``'s leading dimension, as in the public PACE code (for Swin's
    window attention that is one window).
    """

    adapter: ClassVar[str]  # the kind's name, set by each subclass
    has_rank: ClassVar[bool] = True  # whether ``rank`` sizes the adapter's tensors
    frozen: ClassVar[bool] = True  # whether the pre-trained weight and bias stay frozen
    ssf_after_norms: ClassVar[bool] = False  # whether inject puts SSF's scale/shift after the norms

    # Set by pace.inject: the layer's index in the depth schedule and its sigma multiplier there
    # (``sigma = base sigma * noise_scale``, which pace.set_sigma re-applies).
    block_index: Optional[int]
    noise_scale: float
    # False switches the adapter off (the pre-trained layer), as FPA and the FP-distance need.
    adapter_enabled: bool

    def __new__(cls, *args, adapter: Optional[str] = None, **kwargs) -> PaceLinear:
        if cls is PaceLinear:
            cls = layer_class(DEFAULT_ADAPTER if adapter is None else adapter)
        return super().__new__(cls)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        adapter: Optional[str] = None,
        rank: int = 10,
        sigma: float = 0.0,
        noise: str = "gaussian",
        noise_on: str = "delta",
        noise_shape: str = "sample",
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if adapter is not None and adapter != self.adapter:
            raise ValueError(
                f"adapter={adapter!r} given to {type(self).__name__}, the {self.adapter!r} layer"
            )
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        self._sigma = check_layer_options(
            rank=rank if self.has_rank else None,
            sigma=sigma,
            noise=noise,
            noise_on=noise_on,
            noise_shape=noise_shape,
            backend=backend,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank if self.has_rank else 1
        self.noise = noise
        self.noise_on = noise_on
        self.noise_shape = noise_shape
        self.backend = backend
        self.adapter_enabled = True
        self.block_index = None
        self.noise_scale = 1.0

        factory = {"device": device, "dtype": dtype}
        trainable = not self.frozen
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=trainable)
        self.bias = (
            nn.Parameter(torch.empty(out_features, **factory), requires_grad=trainable) if bias else None
        )
        self._make_adapter_parameters(factory)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- setup
    @property
    def sigma(self) -> float:
        """Std of the noise N(1, sigma^2); setting it checks it (NaN would switch the noise off)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = check_sigma(value)

    def _make_adapter_parameters(self, factory: dict) -> None:
        """Create this kind's trainable tensors (``factory``: device and dtype)."""

    def _new_parameter(self, *shape: int, factory: dict) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **factory))

    def _bias_sized_parameter(self, factory: dict) -> Optional[nn.Parameter]:
        """A length-D adapter vector that exists only where the frozen layer has a bias, so merging
        gives back the original architecture (Swin's bias-free patch merging stays bias-free)."""
        return self._new_parameter(self.out_features, factory=factory) if self.bias is not None else None

    def reset_parameters(self) -> None:
        """nn.Linear's init for the (stand-in) pre-trained layer, docs/design.md section 2's for the
        adapter."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """This kind's init (the PACE code's: the adapted model starts equal to the pre-trained one)."""

    @classmethod
    def from_linear(cls, layer: nn.Linear, **kwargs) -> PaceLinear:
        """Wrap a pre-trained ``nn.Linear``: its ``weight``/``bias`` Parameters are shared, not copied.

        The layer is built on the meta device, so no stand-in weight is allocated or initialised
        only to be replaced; the adapter's tensors are then made where the weight lives."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        weight = layer.weight
        module = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
            dtype=weight.dtype,
            **kwargs,
        )
        module.weight = weight
        weight.requires_grad_(not module.frozen)
        if layer.bias is not None:
            module.bias = layer.bias
            layer.bias.requires_grad_(not module.frozen)
        module._make_adapter_parameters({"device": weight.device, "dtype": weight.dtype})
        module.reset_adapter()
        return module

    def adapter_parameters(self) -> dict:
        """The trainable tensors of this layer by their names (the saved-adapter format)."""
        return {n: p for n, p in self.named_parameters(recurse=False) if p.requires_grad}

    # --------------------------------------------------------------------------------------- forward
    def _draw(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not (self.training and self.sigma > 0 and self.adapter_enabled) or x.ndim < 2:
            return None
        shape = (
            (x.shape[0], self.out_features)
            if self.noise_shape == "sample"
            else (*x.shape[:-1], self.out_features)
        )
        return draw_noise(self.noise, self.sigma, shape, device=x.device)

    def delta_bias_vector(self) -> Optional[torch.Tensor]:
        """``db`` of docs/design.md section 2 for this kind, by ordinary autograd (length D or None)."""
        return None

    def _forward_adapted(self, x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        """``x W0^T + b0 + z * dh(x)`` (z may be None): the kind's fused op."""
        raise NotImplementedError

    def _frozen_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.detach(), None if self.bias is None else self.bias.detach())

    def _check_input(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: x must have shape [..., {self.in_features}], "
                f"got [{', '.join(map(str, x.shape))}]"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.adapter_enabled:
            return self._frozen_linear(x)
        z = self._draw(x)
        # The fused ops take multiplicative noise on dh; every other placement is applied after them.
        fused = z is not None and self.noise_on == "delta" and self.noise != "additive"
        out = self._forward_adapted(x, z if fused else None)
        if z is None or fused:
            return out
        if self.noise_on == "delta":  # additive noise on dh: dh + e
            return out + pace_kernels.expand_noise(z, x, out.dtype)
        return self._apply_output_noise(out, z, x)

    def _apply_output_noise(self, out: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        noise = pace_kernels.expand_noise(z, x, out.dtype)
        return out + noise if self.noise == "additive" else out * noise

    # ----------------------------------------------------------------------------------------- merge
    def _merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight from the frozen one (both in the merge's compute dtype)."""
        return weight

    @torch.no_grad()
    def merged_weight_and_bias(self) -> tuple:
        """docs/design.md section 6: the plain layer equal to this one in eval (computed in fp32 at
        least)."""
        w0 = self.weight.detach()
        compute_dtype = torch.promote_types(w0.dtype, torch.float32)
        weight = self._merged_weight(w0.to(compute_dtype))
        bias = None if self.bias is None else self.bias.detach().to(compute_dtype)
        delta_bias = self.delta_bias_vector()
        if delta_bias is not None:
            delta_bias = delta_bias.detach().to(compute_dtype)
            bias = delta_bias if bias is None else bias + delta_bias
        return weight.to(w0.dtype), None if bias is None else bias.to(w0.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded in (docs/design.md section 6)."""
        w, b = self.merged_weight_and_bias()
        layer = nn.Linear(
            self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        layer.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"adapter={self.adapter}, rank={self.rank}, sigma={self.sigma:.4g}, noise={self.noise}, "
            f"noise_on={self.noise_on}, noise_shape={self.noise_shape}, backend={self.backend}"
        )


# ------------------------------------------------------------------------------------ adapter kinds
def _low_rank_product(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return left.to(dtype) @ right.to(dtype)


@_registered
class LoraAddLinear(PaceLinear):
    """LoRA: ``dh = x (B A)^T + db``, ``A = lora_a [r, K]``, ``B = lora_b [D, r]``, ``db = delta_bias``."""

    adapter = "lora_add"

    def _make_adapter_parameters(self, factory: dict) -> None:
        self.lora_a = self._new_parameter(self.rank, self.in_features, factory=factory)
        self.lora_b = self._new_parameter(self.out_features, self.rank, factory=factory)
        self.delta_bias = self._bias_sized_parameter(factory)

    @torch.no_grad()
    def reset_adapter(self) -> None:  # B = 0, A xavier, db = 0
        nn.init.xavier_uniform_(self.lora_a)
        self.lora_b.zero_()
        if self.delta_bias is not None:
            self.delta_bias.zero_()

    def delta_bias_vector(self) -> Optional[torch.Tensor]:
        return self.delta_bias

    def _forward_adapted(self, x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        return pace_kernels.lora_add_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, self.delta_bias, z, backend=self.backend
        )

    def _merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + _low_rank_product(self.lora_b, self.lora_a, weight.dtype)


def _prompt_bias(layer: PaceLinear) -> torch.Tensor:
    """VPT's ``W0 p`` with ``p = P_d P_u``. Its backward needs ``W0`` (``d p = W0^T d db``):
    autocast would cast ``W0`` and save that ``D x K`` copy for backward, so under autocast the
    matrix-vector product runs in the weight's own dtype and saves the parameter itself."""
    w0 = layer.weight.detach()
    prompt = (layer.prompt_down @ layer.prompt_up).squeeze(-1)
    device_type = w0.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return w0 @ prompt.to(w0.dtype)
    return w0 @ prompt


def _make_prompt(layer: PaceLinear, factory: dict) -> None:
    """VPT's prompt ``p = P_d P_u`` with ``P_d = prompt_down [K, r]``, ``P_u = prompt_up [r, 1]``."""
    layer.prompt_down = layer._new_parameter(layer.in_features, layer.rank, factory=factory)
    layer.prompt_up = layer._new_parameter(layer.rank, 1, factory=factory)


def _reset_prompt(layer: PaceLinear) -> None:  # P_d = 0, P_u xavier
    layer.prompt_down.zero_()
    nn.init.xavier_uniform_(layer.prompt_up)


@_registered
class VptAddLinear(PaceLinear):
    """VPT as an added bias: ``dh = db = W0 p``, the same vector for every token. Merging adds a
    bias where the frozen layer had none."""

    adapter = "vpt_add"

    def _make_adapter_parameters(self, factory: dict) -> None:
        _make_prompt(self, factory)

    @torch.no_grad()
    def reset_adapter(self) -> None:
        _reset_prompt(self)

    def delta_bias_vector(self) -> Optional[torch.Tensor]:
        return _prompt_bias(self)

    def _forward_adapted(self, x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        # dh is the constant vector db, so the layer is the frozen linear plus a shift.
        base = self._frozen_linear(x)
        delta_bias = self.delta_bias_vector().to(base.dtype)
        noise = pace_kernels.expand_noise(z, x, base.dtype)
        return base + (delta_bias if noise is None else noise * delta_bias)


@_registered
class LoraMulLinear(PaceLinear):
    """GLoRA-style multiplicative LoRA: ``dh = x (W0 * (B A))^T + db`` with ``db = b0 * bias_scale``."""

    adapter = "lora_mul"

    def _make_adapter_parameters(self, factory: dict) -> None:
        self.lora_a = self._new_parameter(self.rank, self.in_features, factory=factory)
        self.lora_b = self._new_parameter(self.out_features, self.rank, factory=factory)
        self.bias_scale = self._bias_sized_parameter(factory)

    @torch.no_grad()
    def reset_adapter(self) -> None:  # B = 0, A xavier, bias scale 0
        nn.init.xavier_uniform_(self.lora_a)
        self.lora_b.zero_()
        if self.bias_scale is not None:
            self.bias_scale.zero_()

    def _scaled_bias(self) -> Optional[torch.Tensor]:
        return None if self.bias is None else self.bias.detach() * self.bias_scale

    def delta_bias_vector(self) -> Optional[torch.Tensor]:
        return self._scaled_bias()

    def _forward_adapted(self, x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        return pace_kernels.lora_mul_linear(
            x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.delta_bias_vector(),
            z,
            backend=self.backend,
        )

    def _merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + _low_rank_product(self.lora_b, self.lora_a, weight.dtype))


@_registered
class LoraMulVptAddLinear(LoraMulLinear):
    """PACE's default: multiplicative LoRA plus the VPT bias, ``db = W0 p + b0 * bias_scale``."""

    adapter = "lora_mul_vpt_add"

    def _make_adapter_parameters(self, factory: dict) -> None:
        self.lora_a = self._new_parameter(self.rank, self.in_features, factory=factory)
        self.lora_b = self._new_parameter(self.out_features, self.rank, factory=factory)
        _make_prompt(self, factory)
        self.bias_scale = self._bias_sized_parameter(factory)

    @torch.no_grad()
    def reset_adapter(self) -> None:
        super().reset_adapter()
        _reset_prompt(self)

    def delta_bias_vector(self) -> Optional[torch.Tensor]:
        prompt_bias = _prompt_bias(self)
        scaled = self._scaled_bias()
        return prompt_bias if scaled is None else prompt_bias + scaled


@_registered
class RlrrLinear(PaceLinear):
    """RLRR: ``W0 * (1 + s_l s_r)`` with ``s_l = scale_left [D, 1]``, ``s_r = scale_right [1, K]``,
    and ``db = shift``; it runs on the ``lora_mul`` op as a rank-1 factor pair."""

    adapter = "rlrr"
    has_rank = False
    ssf_after_norms = True

    def _make_adapter_parameters(self, factory: dict) -> None:
        self.scale_left = self._new_parameter(self.out_features, 1, factory=factory)
        self.scale_right = self._new_parameter(1, self.in_features, factory=factory)
        self.shift = self._bias_sized_parameter(factory)

    @torch.no_grad()
    def reset_adapter(self) -> None:  # RLRR's code: kaiming-uniform scales, shift 0
        nn.init.kaiming_uniform_(self.scale_left, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.scale_right, a=math.sqrt(5))
        if self.shift is not None:
            self.shift.zero_()

    def delta_bias_vector(self) -> Optional[torch.Tensor]:
        return self.shift

    def _forward_adapted(self, x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        return pace_kernels.lora_mul_linear(
            x, self.weight, self.bias, self.scale_right, self.scale_left, self.shift, z, backend=self.backend
        )

    def _merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + _low_rank_product(self.scale_left, self.scale_right, weight.dtype))


@_registered
class PaceHead(PaceLinear):
    """The classifier head: the whole layer trainable, its output ``x W^T + b`` scaled (or, with
    ``noise="additive"``, shifted) by the noise whatever ``noise_on`` says; ``adapters_disabled``
    leaves it on, since the pre-trained model has no head for the new task."""

    adapter = "head"
    has_rank = False
    frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        out = F.linear(x, self.weight, self.bias)
        z = self._draw(x)
        return out if z is None else self._apply_output_noise(out, z, x)


class SSFNorm(nn.Module):
    """A frozen norm layer followed by SSF's trainable per-channel ``scale`` and ``shift`` (RLRR)."""

    def __init__(self, norm: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm = norm
        self.norm.requires_grad_(False)
        p = next(norm.parameters(), None)
        kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        self.scale = nn.Parameter(torch.empty(dim, **kw))
        self.shift = nn.Parameter(torch.empty(dim, **kw))
        self.adapter_enabled = True
        with torch.no_grad():  # SSF's init: scale ~ N(1, 0.02), shift ~ N(0, 0.02)
            nn.init.normal_(self.scale, 1.0, 0.02)
            nn.init.normal_(self.shift, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return y * self.scale + self.shift if self.adapter_enabled else y

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """Fold scale/shift into the norm's affine: ``(n(x) g + b) s + t = n(x) (g s) + (b s + t)``.

        Checked on a probe input: a norm whose output is not ``n(x) * weight + bias`` (an RMSNorm
        without a bias, such as ``LlamaRMSNorm``, or one scaling by ``1 + weight``) cannot hold the
        shift; it stays wrapped, frozen, so the merged model's output is still exact."""
        norm = self.norm
        if getattr(norm, "weight", None) is None:
            raise ValueError("SSFNorm.merged needs a norm layer with an affine weight")
        probe = torch.randn(4, self.scale.shape[0], device=self.scale.device, dtype=self.scale.dtype)
        expected = self(probe)
        had_bias = hasattr(norm, "bias")
        old_bias = getattr(norm, "bias", None)
        weight = norm.weight.detach().clone()
        bias = old_bias.detach().clone() if isinstance(old_bias, torch.Tensor) else None
        norm.weight.mul_(self.scale)
        if bias is None:
            norm.bias = nn.Parameter(self.shift.detach().clone(), requires_grad=False)
        else:
            norm.bias.mul_(self.scale).add_(self.shift)
        if torch.allclose(norm(probe), expected, rtol=1e-4, atol=1e-5):
            return norm
        norm.weight.copy_(weight)
        if bias is not None:
            norm.bias.copy_(bias)
        elif had_bias:
            norm.bias = old_bias
        else:
            del norm.bias
        self.requires_grad_(False)
        return self
