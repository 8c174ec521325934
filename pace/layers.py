"""Drop-in PACE linear layers (SPEC section 2) and the SSF scale/shift that RLRR puts after norms.

:class:`PaceLinear` holds the frozen pre-trained ``weight``/``bias`` under the names ``nn.Linear``
uses (code that reads ``layer.weight`` keeps working) plus one adapter kind's trainable tensors, and
perturbs the adapter output with per-sample noise while training. The heavy lifting is done by
:mod:`pace_kernels` (fused Triton kernels on CUDA, the reference elsewhere).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pace_kernels
from pace_kernels._checks import check_backend
from pace_kernels.reference import expand_noise

from .noise import check_noise_kind, draw_noise

ADAPTER_KINDS = ("lora_add", "lora_mul", "vpt_add", "lora_mul_vpt_add", "rlrr", "head")
_RANKED_KINDS = ("lora_add", "lora_mul", "vpt_add", "lora_mul_vpt_add")

__all__ = ["ADAPTER_KINDS", "PaceLinear", "SSFNorm"]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_sigma(sigma: object) -> float:
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float))
        or not math.isfinite(sigma)
        or sigma < 0
    ):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


class PaceLinear(nn.Module):
    """``nn.Linear`` with a frozen pre-trained layer, one adapter and PACE noise.

    ``Y = x W0^T + b0 + z * dh(x)`` with ``z ~ N(1, sigma^2)`` drawn per (sample, output channel)
    while training (``noise_shape="token"``: per token), none in eval or when ``sigma == 0``.
    ``adapter="head"`` makes the whole layer trainable with a noisy output ``z * (x W^T + b)``.

    Ablations of the PACE paper: ``noise="dropout"`` (Bernoulli noise of the same mean and
    variance), ``noise="additive"`` (``dh + e``, ``e ~ N(0, sigma^2)``), ``noise_on="output"`` (the
    noise scales the whole output ``h + dh`` rather than ``dh``).

    A "sample" is one entry of ``x``'s leading dimension, as in the public PACE code (for Swin's
    window attention that is one window).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        adapter: str = "lora_mul_vpt_add",
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
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        if adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {adapter!r}")
        if adapter in _RANKED_KINDS:
            _check_positive_int("rank", rank)
        check_noise_kind(noise)
        if noise_on not in ("delta", "output"):
            raise ValueError(f"noise_on must be 'delta' or 'output', got {noise_on!r}")
        if noise_shape not in ("sample", "token"):
            raise ValueError(f"noise_shape must be 'sample' or 'token', got {noise_shape!r}")
        check_backend(backend)

        self.in_features = in_features
        self.out_features = out_features
        self.adapter = adapter
        self.rank = rank if adapter in _RANKED_KINDS else 1
        self.sigma = check_sigma(sigma)
        self.noise = noise
        self.noise_on = noise_on
        self.noise_shape = noise_shape
        self.backend = backend
        # False switches the adapter off (the pre-trained layer), as FPA and the FP-distance need.
        self.adapter_enabled = True

        kw = {"device": device, "dtype": dtype}
        frozen = adapter != "head"
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=not frozen)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=not frozen) if bias else None
        self._make_adapter(kw)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- setup

    @property
    def sigma(self) -> float:
        """Std of the noise N(1, sigma^2); setting it checks it (NaN would switch the noise off)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = check_sigma(value)

    def _make_adapter(self, kw) -> None:
        d, k, r = self.out_features, self.in_features, self.rank
        kind = self.adapter
        if kind in ("lora_add", "lora_mul", "lora_mul_vpt_add"):
            self.lora_a = nn.Parameter(torch.empty(r, k, **kw))
            self.lora_b = nn.Parameter(torch.empty(d, r, **kw))
        # Adapter bias terms live only where the frozen layer has a bias, so merging gives back the
        # original architecture (Swin's bias-free patch merging stays bias-free); VPT is the exception:
        # its whole adapter is a bias, and merging it adds one.
        has_bias = self.bias is not None
        if kind == "lora_add":
            self.delta_bias = nn.Parameter(torch.empty(d, **kw)) if has_bias else None
        if kind in ("vpt_add", "lora_mul_vpt_add"):
            self.prompt_down = nn.Parameter(torch.empty(k, r, **kw))
            self.prompt_up = nn.Parameter(torch.empty(r, 1, **kw))
        if kind in ("lora_mul", "lora_mul_vpt_add"):
            self.bias_scale = nn.Parameter(torch.empty(d, **kw)) if has_bias else None
        if kind == "rlrr":
            self.scale_left = nn.Parameter(torch.empty(d, 1, **kw))
            self.scale_right = nn.Parameter(torch.empty(1, k, **kw))
            self.shift = nn.Parameter(torch.empty(d, **kw)) if has_bias else None

    def reset_parameters(self) -> None:
        """nn.Linear's init for the (stand-in) pre-trained layer, SPEC section 2's for the adapter."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """PACE code init: B = 0 (adapted model == pre-trained), A and P_u xavier, P_d = 0, db = 0."""
        for name in ("lora_b", "delta_bias", "prompt_down", "bias_scale", "shift"):
            p = getattr(self, name, None)
            if p is not None:
                p.zero_()
        for name in ("lora_a", "prompt_up"):
            p = getattr(self, name, None)
            if p is not None:
                nn.init.xavier_uniform_(p)
        if self.adapter == "rlrr":  # RLRR's code: kaiming-uniform scales
            nn.init.kaiming_uniform_(self.scale_left, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.scale_right, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, layer: nn.Linear, **kwargs) -> PaceLinear:
        """Wrap a pre-trained ``nn.Linear``: its ``weight``/``bias`` Parameters are shared, not copied."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        w = layer.weight
        mod = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        trainable = mod.adapter == "head"
        mod.weight = layer.weight
        mod.weight.requires_grad_(trainable)
        if layer.bias is not None:
            mod.bias = layer.bias
            mod.bias.requires_grad_(trainable)
        return mod

    def adapter_parameters(self) -> dict:
        """The trainable tensors of this layer by their SPEC names (the saved-adapter format)."""
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
        """``db`` of SPEC section 2 for this kind, by ordinary autograd (a vector of length D)."""
        kind = self.adapter
        db = None
        if kind in ("vpt_add", "lora_mul_vpt_add"):
            db = self.weight.detach() @ (self.prompt_down @ self.prompt_up).squeeze(-1)
        if kind in ("lora_mul", "lora_mul_vpt_add") and self.bias is not None:
            scaled = self.bias.detach() * self.bias_scale
            db = scaled if db is None else db + scaled
        if kind == "lora_add":
            db = self.delta_bias
        if kind == "rlrr":
            db = self.shift
        return db

    def _forward_adapted(self, x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        """``x W0^T + b0 + z * dh(x)`` (z may be None)."""
        kind, w, b = self.adapter, self.weight, self.bias
        db = self.delta_bias_vector()
        if kind == "lora_add":
            return pace_kernels.lora_add_linear(
                x, w, b, self.lora_a, self.lora_b, db, z, backend=self.backend
            )
        if kind in ("lora_mul", "lora_mul_vpt_add"):
            return pace_kernels.lora_mul_linear(
                x, w, b, self.lora_a, self.lora_b, db, z, backend=self.backend
            )
        if kind == "rlrr":
            return pace_kernels.lora_mul_linear(
                x, w, b, self.scale_right, self.scale_left, db, z, backend=self.backend
            )
        # vpt_add: dh is the constant vector db, so the layer is the frozen linear plus a shift.
        base = F.linear(x, w.detach(), None if b is None else b.detach())
        zr = expand_noise(z, x, base.dtype)
        return base + (db.to(base.dtype) if zr is None else zr * db.to(base.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"PaceLinear: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"PaceLinear: x must have shape [..., {self.in_features}], "
                f"got [{', '.join(map(str, x.shape))}]"
            )
        z = self._draw(x)
        if self.adapter == "head" or not self.adapter_enabled:
            frozen = self.adapter != "head"
            out = F.linear(
                x,
                self.weight.detach() if frozen else self.weight,
                self.bias.detach() if frozen and self.bias is not None else self.bias,
            )
            return out if z is None else self._apply_output_noise(out, z, x)
        # The fused ops take multiplicative noise on dh; every other placement is applied after them.
        fused = z is not None and self.noise_on == "delta" and self.noise != "additive"
        out = self._forward_adapted(x, z if fused else None)
        if z is None or fused:
            return out
        if self.noise_on == "delta":  # additive noise on dh: dh + e
            return out + expand_noise(z, x, out.dtype)
        return self._apply_output_noise(out, z, x)

    def _apply_output_noise(self, out: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        zr = expand_noise(z, x, out.dtype)
        return out + zr if self.noise == "additive" else out * zr

    # ----------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merged_weight_and_bias(self) -> tuple:
        """SPEC section 6: the plain layer equal to this one in eval (computed in fp32 at least)."""
        w0 = self.weight.detach()
        cdt = torch.promote_types(w0.dtype, torch.float32)
        w = w0.to(cdt)
        b0 = None if self.bias is None else self.bias.detach().to(cdt)
        db = self.delta_bias_vector() if self.adapter != "head" else None
        db = None if db is None else db.detach().to(cdt)
        kind = self.adapter
        if kind == "lora_add":
            w = w + self.lora_b.to(cdt) @ self.lora_a.to(cdt)
        elif kind in ("lora_mul", "lora_mul_vpt_add"):
            w = w * (1 + self.lora_b.to(cdt) @ self.lora_a.to(cdt))
        elif kind == "rlrr":
            w = w * (1 + self.scale_left.to(cdt) @ self.scale_right.to(cdt))
        if db is not None:
            b0 = db if b0 is None else b0 + db
        return w.to(w0.dtype), None if b0 is None else b0.to(w0.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded in (SPEC section 6)."""
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
        """Fold scale/shift into the norm's affine: ``(n(x) g + b) s + t = n(x) (g s) + (b s + t)``."""
        norm = self.norm
        if getattr(norm, "weight", None) is None:
            raise ValueError("SSFNorm.merged needs a norm layer with an affine weight")
        norm.weight.mul_(self.scale)
        if norm.bias is None:
            norm.bias = nn.Parameter(self.shift.detach().clone(), requires_grad=False)
        else:
            norm.bias.mul_(self.scale).add_(self.shift)
        return norm
