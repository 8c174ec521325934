"""The PACE objectives of docs/design.md section 5 behind one object a training loop calls.

>>> crit = PaceCriterion(mode="pace", lam=1.0)
>>> out = crit(model, x, y, index=idx, step=step)   # out.loss.backward()

``x`` may be a tensor or a mapping of keyword tensors (a Hugging Face batch: ``model(**x)``); the
model may return logits, a tuple whose first element they are, or an object or mapping with
``logits``. Labels are per sample ``[B]`` or per token ``[B, T]`` (docs/design.md section 5, token-level
outputs: positions labelled ``ignore_index`` count in neither the loss nor the consistency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dropout import MultiCopyPass, reused_masks
from .inject import adapters_disabled

__all__ = ["MODES", "PaceCriterion", "PaceOutput", "consistency", "output_logits", "repeat_inputs"]

MODES = ("none", "pace", "fast", "lazy", "fpa")

Inputs = Union[torch.Tensor, Mapping[str, Any]]


def _batch_size(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("inputs hold no tensor with a batch dimension")


def _check_inputs(inputs: object) -> None:
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 0:
            raise ValueError("inputs must have a batch dimension, got a 0-d tensor")
        return
    if not isinstance(inputs, Mapping):
        raise TypeError(
            "inputs must be a tensor or a mapping of keyword tensors (model(**inputs)), "
            f"got {type(inputs).__name__}"
        )
    _batch_size(inputs)


def _map_batch(inputs: Inputs, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """Apply ``fn`` to ``inputs`` (a tensor) or to every tensor of the mapping whose first dimension
    is the batch; other entries (scalars, flags, tensors of other shapes) pass through unchanged."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    return {
        k: fn(v) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch else v
        for k, v in inputs.items()
    }


def repeat_inputs(inputs: Inputs, copies: int) -> Inputs:
    """The batch ``[x; x; ...]`` of ``copies`` copies: a tensor, or every tensor of a keyword mapping
    whose first dimension is the batch (``input_ids``, ``attention_mask``, ...), concatenated
    ``copies`` times along that dimension, so copy ``c`` of sample ``b`` sits at row ``c*B + b``."""
    if copies == 1:
        return inputs
    batch = _batch_size(inputs)
    return _map_batch(inputs, batch, lambda t: torch.cat([t] * copies))


def _first_rows(inputs: Inputs, batch: int, rows: int) -> Inputs:
    return _map_batch(inputs, batch, lambda t: t[:rows])


def _call(model: nn.Module, inputs: Inputs) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, the first element of a tuple or list, or
    the ``logits`` entry of a mapping or attribute of an object (Hugging Face ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        "the model's output has no logits: expected a tensor, a tuple whose first element is the "
        f"logits, or an object or mapping with a 'logits' tensor, got {type(output).__name__}"
    )


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


def _masked_consistency(f1: torch.Tensor, f2: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`consistency` over the positions ``keep`` marks (all when ``None``): the mean over those
    positions of ``sum_c (f1 - f2)^2``; 0 when none is marked."""
    per_position = (f1 - f2).square().sum(dim=-1)
    if keep is None:
        return per_position.mean()
    # weights, not boolean indexing: no host sync, and an empty mask gives 0 rather than NaN
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


def _multi_copy_consistency(
    chunks: Sequence[torch.Tensor], keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean over the ``M*(M-1)/2`` pairs of the ``M`` copies' logits (PACE paper Fig. 5)."""
    pairs = [
        _masked_consistency(chunks[i], chunks[j], keep)
        for i in range(len(chunks))
        for j in range(i + 1, len(chunks))
    ]
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
      Per-sample labels only: per-token labels would need a bank ``[num_samples, T, vocab]``.
    - ``"lazy"``: at steps ``step % lazy_interval == 0`` the first half of the batch runs as two
      copies with the PACE loss; at other steps one copy of the full batch with ``CE`` alone.
    - ``"fpa"``: ``CE(f, y) + lam * consistency(f, f_pretrained)`` with the adapters switched off
      (no noise, no gradient) for ``f_pretrained``.

    ``x`` is a tensor (``model(x)``) or a mapping of keyword tensors (``model(**x)``: every tensor
    whose first dimension is the batch, ``attention_mask`` included, is repeated for the copies).
    Labels ``[B]`` score logits ``[B, C]``; labels ``[B, T]`` score logits ``[B, T, C]`` token by
    token, and with ``shift_labels=True`` (causal LMs) position ``t`` is scored against label
    ``t + 1``. Positions labelled ``ignore_index`` count in neither the loss nor the consistency,
    which becomes the mean over labelled positions of ``sum_c (f1 - f2)^2``. A custom ``cls_loss``
    receives per-sample logits and labels as given, or for per-token labels the labelled positions
    only (``[n, C]`` and ``[n]``).
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
        shift_labels: bool = False,
        ignore_index: int = -100,
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
        if not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be a bool, got {shift_labels!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.mode = mode
        self.lam = float(lam)
        self.copies = copies
        self.lazy_interval = lazy_interval
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        self._default_cls_loss = cls_loss is None
        self.cls_loss = (
            cls_loss if cls_loss is not None else partial(F.cross_entropy, ignore_index=ignore_index)
        )
        if mode == "fast":
            for name, v in (("num_samples", num_samples), ("num_classes", num_classes)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"mode='fast' needs {name} (a positive int), got {v!r}")
            self.register_buffer("history_bank", torch.zeros(num_samples, num_classes))
        else:
            self.history_bank = None

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, lam={self.lam}, copies={self.copies}, lazy_interval={self.lazy_interval}, "
            f"shift_labels={self.shift_labels}"
        )

    def _copies_forward(self, model: nn.Module, x: Inputs, copies: int) -> torch.Tensor:
        """``model`` on ``copies`` copies of ``x`` stacked along the batch; the copy count is bound
        to the output, so forwards that gradient checkpointing replays in its backward share masks
        (and draw the same masks and noise) as this one did."""
        with MultiCopyPass(model, copies) as layout:
            return layout.bind(output_logits(_call(model, repeat_inputs(x, copies))))

    @staticmethod
    def _is_per_token(y: torch.Tensor) -> bool:
        return y.ndim == 2 and not y.is_floating_point()

    def _scored(
        self, logits: torch.Tensor, y: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The logits and labels that are scored, and the mask of positions that count in the
        consistency (``None``: all). Per-token logits are shifted for causal LMs here."""
        if logits.ndim == 3 and self._is_per_token(y):
            if self.shift_labels:
                logits, y = logits[:, :-1], y[:, 1:]
            if logits.shape[:2] != y.shape:
                raise ValueError(
                    f"per-token labels must have shape [B, T] = {list(logits.shape[:2])} to match "
                    f"logits {list(logits.shape)}{' after the shift' if self.shift_labels else ''}, "
                    f"got {list(y.shape)}"
                )
            return logits, y, y != self.ignore_index
        if logits.ndim == 2 and y.shape[:1] == logits.shape[:1] and (y.ndim == 1 or y.shape == logits.shape):
            keep = (y != self.ignore_index) if y.ndim == 1 and not y.is_floating_point() else None
            return logits, y, keep
        raise ValueError(
            f"labels of shape {list(y.shape)} do not fit logits of shape {list(logits.shape)}: expected "
            "labels [B] (or class probabilities [B, C]) for logits [B, C], or integer labels [B, T] for "
            "per-token logits [B, T, C]"
        )

    def _task_loss(
        self, logits: torch.Tensor, y: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The classification loss over the scored positions, and what :meth:`_scored` returned."""
        logits, y, keep = self._scored(logits, y)
        if logits.ndim == 2:
            return self.cls_loss(logits, y), logits, keep
        if self._default_cls_loss:  # the mean over labelled tokens without a host sync; 0 if none
            total = F.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=self.ignore_index, reduction="sum"
            )
            return total / keep.sum().clamp_min(1), logits, keep
        return self.cls_loss(logits[keep], y[keep]), logits, keep

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The classification loss alone (no copies, no consistency), with this criterion's label
        handling (per-token labels, ``shift_labels``, ``ignore_index``): for evaluation."""
        return self._task_loss(logits, labels)[0]

    def _check_batch(self, x: Inputs, y: torch.Tensor) -> None:
        _check_inputs(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(y).__name__}")
        batch = _batch_size(x)
        if y.ndim == 0 or y.shape[0] != batch:
            raise ValueError(
                f"labels must have the batch size {batch} as first dimension ([B] or [B, T]), "
                f"got shape {list(y.shape)}"
            )
        if self.mode == "fast" and self._is_per_token(y):
            raise ValueError(
                "mode='fast' supports per-sample labels [B] only: its history bank keeps one row of "
                "logits per dataset sample ([num_samples, num_classes]); per-token labels [B, T] would "
                "need a bank [num_samples, T, vocab], too large to keep for a language model. Use "
                "mode='pace' or 'lazy' for token-level outputs"
            )

    def forward(
        self,
        model: nn.Module,
        x: Inputs,
        y: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        step: int = 0,
    ) -> PaceOutput:
        self._check_batch(x, y)
        mode = self.mode
        if mode == "pace" or (mode == "lazy" and step % self.lazy_interval == 0):
            if mode == "lazy":
                batch = y.shape[0]
                half = max(batch // 2, 1)
                x, y = _first_rows(x, batch, half), y[:half]
            copies = self.copies if mode == "pace" else 2
            logits = self._copies_forward(model, x, copies)
            chunks = logits.chunk(copies)
            f1 = chunks[0]
            cls, _, keep = self._task_loss(f1, y)
            cons = _multi_copy_consistency([self._scored(c, y)[0] for c in chunks], keep)
            return PaceOutput(cls + self.lam * cons, cls, cons, f1, y)

        if mode == "fpa":
            # The pre-trained pass reuses this pass's DropPath masks: only the adapters differ.
            with reused_masks(model):
                logits = self._copies_forward(model, x, 1)
                with torch.no_grad(), adapters_disabled(model):
                    ref = output_logits(_call(model, x))
            cls, scored, keep = self._task_loss(logits, y)
            cons = _masked_consistency(scored, self._scored(ref.detach(), y)[0], keep)
            return PaceOutput(cls + self.lam * cons, cls, cons, logits, y)
        logits = self._copies_forward(model, x, 1)
        cls, scored, keep = self._task_loss(logits, y)
        if mode in ("none", "lazy"):
            return PaceOutput(cls, cls, logits.new_zeros(()).float(), logits, y)

        # fast: read the bank's rows before writing this step's logits into them
        if index is None:
            raise ValueError("mode='fast' needs index= (the dataset indices of the batch)")
        index = _checked_index(index, len(self.history_bank))
        index = index.to(self.history_bank.device)
        if index.shape != (y.shape[0],):
            raise ValueError(
                f"index must have shape [{y.shape[0]}] (one dataset index per sample), "
                f"got {list(index.shape)}"
            )
        if logits.ndim != 2 or logits.shape[-1] != self.history_bank.shape[1]:
            raise ValueError(
                f"logits of shape {list(logits.shape)} do not fit the history bank: it holds "
                f"{self.history_bank.shape[1]} classes per sample "
                f"([B, {self.history_bank.shape[1]}] expected)"
            )
        past = self.history_bank[index].to(device=logits.device, dtype=logits.dtype)
        cons = _masked_consistency(logits, past, keep)
        self.update_bank(index, logits)
        return PaceOutput(cls + self.lam * cons, cls, cons, logits, y)

    @torch.no_grad()
    def update_bank(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Write ``logits`` into the history bank rows ``index`` (PACE_fast)."""
        self.history_bank[index.to(self.history_bank.device).long()] = logits.detach().to(self.history_bank)
