"""The PACE objectives of SPEC section 5 behind one object a training loop calls.

>>> crit = PaceCriterion(mode="pace", lam=1.0)
>>> out = crit(model, x, y, index=idx, step=step)   # out.loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dropout import reused_masks, set_copies
from .inject import adapters_disabled

__all__ = ["MODES", "PaceCriterion", "PaceOutput", "consistency"]

MODES = ("none", "pace", "fast", "lazy", "fpa")


@dataclass
class PaceOutput:
    """``loss = cls_loss + lam * consistency``; ``logits`` are copy 1's and ``targets`` their labels
    (for a lazy PACE step, the first half of the batch)."""

    loss: torch.Tensor
    cls_loss: torch.Tensor
    consistency: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


def consistency(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_c (f1 - f2)^2``, the PACE consistency between two sets of logits."""
    return (f1 - f2).square().sum(dim=-1).mean()


def _multi_copy_consistency(logits: torch.Tensor, copies: int) -> torch.Tensor:
    """Mean over the ``copies*(copies-1)/2`` pairs of copies (PACE paper Fig. 5)."""
    chunks = logits.chunk(copies)
    pairs = [consistency(chunks[i], chunks[j]) for i in range(copies) for j in range(i + 1, copies)]
    return torch.stack(pairs).mean()


def _checked_index(index, num_samples: int) -> torch.Tensor:
    """PACE_fast's dataset indices: integers in ``0 .. num_samples - 1`` (a negative index would
    read and overwrite another sample's bank row)."""
    index = torch.as_tensor(index)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must hold integers (dataset indices), got dtype {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
        raise ValueError(
            f"index must lie in 0..{num_samples - 1} (the bank's rows), got values "
            f"{int(index.min())}..{int(index.max())}"
        )
    return index.long()


class PaceCriterion(nn.Module):
    """PACE, PACE_fast, PACE_lazy_half and FPA around a classification loss.

    - ``"none"``: ``CE(f(x), y)``.
    - ``"pace"``: the batch ``[x; x]`` (``copies`` copies) runs once with DropPath masks shared;
      ``CE(f1, y) + lam * consistency`` averaged over pairs of copies.
    - ``"fast"``: one copy; a history bank ``[num_samples, num_classes]`` (zeros at start) of each
      sample's last logits: ``CE(f, y) + lam * consistency(f, H[index])``, then ``H[index] = f``.
    - ``"lazy"``: at steps ``step % lazy_interval == 0`` the first half of the batch runs as two
      copies with the PACE loss; at other steps one copy of the full batch with ``CE`` alone.
    - ``"fpa"``: ``CE(f, y) + lam * consistency(f, f_pretrained)`` with the adapters switched off
      (no noise, no gradient) for ``f_pretrained``.
    """

    def __init__(
        self,
        mode: str = "pace",
        lam: float = 1.0,
        *,
        copies: int = 2,
        lazy_interval: int = 2,
        num_samples: Optional[int] = None,
        num_classes: Optional[int] = None,
        cls_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 2:
            raise ValueError(f"copies must be an int >= 2, got {copies!r}")
        if isinstance(lazy_interval, bool) or not isinstance(lazy_interval, int) or lazy_interval < 1:
            raise ValueError(f"lazy_interval must be an int >= 1, got {lazy_interval!r}")
        self.mode = mode
        self.lam = float(lam)
        self.copies = copies
        self.lazy_interval = lazy_interval
        self.cls_loss = cls_loss if cls_loss is not None else F.cross_entropy
        if mode == "fast":
            for name, v in (("num_samples", num_samples), ("num_classes", num_classes)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"mode='fast' needs {name} (a positive int), got {v!r}")
            self.register_buffer("history_bank", torch.zeros(num_samples, num_classes))
        else:
            self.history_bank = None

    def extra_repr(self) -> str:
        return f"mode={self.mode}, lam={self.lam}, copies={self.copies}, lazy_interval={self.lazy_interval}"

    def _copies_forward(self, model: nn.Module, x: torch.Tensor, copies: int) -> torch.Tensor:
        set_copies(model, copies)
        try:
            return model(torch.cat([x] * copies))
        finally:
            set_copies(model, 1)

    def forward(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        step: int = 0,
    ) -> PaceOutput:
        mode = self.mode
        if mode == "pace" or (mode == "lazy" and step % self.lazy_interval == 0):
            if mode == "lazy":
                half = max(x.shape[0] // 2, 1)
                x, y = x[:half], y[:half]
            copies = self.copies if mode == "pace" else 2
            logits = self._copies_forward(model, x, copies)
            f1 = logits.chunk(copies)[0]
            cls = self.cls_loss(f1, y)
            cons = _multi_copy_consistency(logits, copies)
            return PaceOutput(cls + self.lam * cons, cls, cons, f1, y)

        set_copies(model, 1)
        if mode == "fpa":
            # The pre-trained pass reuses this pass's DropPath masks: only the adapters differ.
            with reused_masks(model):
                logits = model(x)
                with torch.no_grad(), adapters_disabled(model):
                    ref = model(x)
            cls = self.cls_loss(logits, y)
            cons = consistency(logits, ref.detach())
            return PaceOutput(cls + self.lam * cons, cls, cons, logits, y)
        logits = model(x)
        cls = self.cls_loss(logits, y)
        if mode in ("none", "lazy"):
            return PaceOutput(cls, cls, logits.new_zeros(()).float(), logits, y)

        # fast: read the bank's rows before writing this step's logits into them
        if index is None:
            raise ValueError("mode='fast' needs index= (the dataset indices of the batch)")
        index = _checked_index(index, len(self.history_bank))
        index = index.to(self.history_bank.device)
        if index.shape != (x.shape[0],):
            raise ValueError(
                f"index must have shape [{x.shape[0]}] (one dataset index per sample), "
                f"got {list(index.shape)}"
            )
        if logits.shape[-1] != self.history_bank.shape[1]:
            raise ValueError(
                f"logits have {logits.shape[-1]} classes but the history bank holds "
                f"{self.history_bank.shape[1]}"
            )
        past = self.history_bank[index].to(device=logits.device, dtype=logits.dtype)
        cons = consistency(logits, past)
        self.update_bank(index, logits)
        return PaceOutput(cls + self.lam * cons, cls, cons, logits, y)

    @torch.no_grad()
    def update_bank(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Write ``logits`` into the history bank rows ``index`` (PACE_fast)."""
        self.history_bank[index.to(self.history_bank.device).long()] = logits.detach().to(self.history_bank)
