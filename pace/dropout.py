"""Stochastic layers that share one mask per sample across the copies of a multi-copy batch.

PACE's consistency loss compares copies of the same sample that differ only by the adapter noise
(docs/design.md section 4): DropPath and dropout must draw one mask per sample and reuse it for every copy.
In a batch of ``M*B`` rows, copy ``c`` of sample ``b`` sits at row ``c*B + b``.

Attention dropout is shared too: :func:`pace.inject` switches timm attention modules whose
``attn_drop`` is active to their non-fused path, which calls the (shared) ``attn_drop`` module
instead of passing its probability to ``scaled_dot_product_attention``. Dropout that no module
applies (inside Hugging Face attention functions, functional dropout) cannot be shared: inject
refuses it and names the setting to turn off.

The copy count is a module attribute (``pace_copies``) that :class:`MultiCopyPass` sets for one
pass and binds to the pass's output, so forwards replayed by gradient checkpointing see it too.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["SharedDropPath", "SharedDropout", "set_copies", "reused_masks", "MultiCopyPass"]


class _SharedMaskLayer(nn.Module):
    """Draws a per-sample mask for one copy and tiles it over ``pace_copies`` copies; inside
    :func:`reused_masks` the first mask drawn is kept and handed out again."""

    def __init__(self) -> None:
        super().__init__()
        self.pace_copies = 1
        self._mask_memo: Optional[dict] = None

    def _mask(self, x: torch.Tensor, tail_shape, keep: float) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self in _BACKWARD_LAYOUTS and _current_graph_task() == -1:
            _forget_backward_layout(self)  # left by a backward that raised: no backward runs now
        memo = self._mask_memo
        if memo is not None and "mask" in memo and memo["mask"].shape[0] == x.shape[0]:
            return memo["mask"]
        rows, copies = x.shape[0], self.pace_copies
        if copies > 1 and rows % copies != 0:
            raise ValueError(f"batch of {rows} rows is not {copies} copies of one batch (see set_copies)")
        per_copy = rows // copies
        mask = torch.empty((per_copy, *tail_shape), device=x.device, dtype=x.dtype).bernoulli_(keep)
        mask = self._scale(mask, keep).repeat(copies, *([1] * len(tail_shape)))
        if memo is not None:
            memo["mask"] = mask
        return mask

    def _scale(self, mask: torch.Tensor, keep: float) -> torch.Tensor:
        return mask / keep if keep > 0 else mask


class SharedDropPath(_SharedMaskLayer):
    """Stochastic depth (one keep/drop decision per sample) whose mask is shared by the copies.

    ``mean_normalize=True`` (the default, as the public PACE code does) divides the mask by its
    batch mean, so the kept residual branches always average to 1; ``False`` keeps timm's
    ``1 / keep_prob`` scaling only.
    """

    def __init__(
        self, drop_prob: float = 0.0, scale_by_keep: bool = True, mean_normalize: bool = True
    ) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.mean_normalize = mean_normalize

    def _scale(self, mask: torch.Tensor, keep: float) -> torch.Tensor:
        if self.scale_by_keep and keep > 0.0:
            mask = mask / keep
        if self.mean_normalize:
            mask = mask / (mask.mean() + 1e-12)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self._mask(x, (1,) * (x.ndim - 1), 1.0 - self.drop_prob)

    def extra_repr(self) -> str:
        return (
            f"drop_prob={self.drop_prob:.3f}, mean_normalize={self.mean_normalize}, copies={self.pace_copies}"
        )


class SharedDropout(_SharedMaskLayer):
    """Dropout whose element mask is drawn for one copy and reused for the others."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self._mask(x, x.shape[1:], 1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, copies={self.pace_copies}"


def _check_copies(copies: object) -> int:
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    return copies


def _copy_aware_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "pace_copies")]


def set_copies(model: nn.Module, copies: int) -> None:
    """Tell every shared stochastic layer (any module with a ``pace_copies`` attribute, so a layer
    of your own can take part) that the next batches hold ``copies`` copies of each sample.

    The count stays in force until changed; :class:`MultiCopyPass` sets it for one pass only and
    keeps it right for the replays that gradient checkpointing makes during that pass's backward."""
    _check_copies(copies)
    for m in _copy_aware_modules(model):
        _forget_backward_layout(m)
        m.pace_copies = copies


# While autograd runs the backward through the output of a MultiCopyPass, each copy-aware module
# of its model holds that pass's count; these entries, (graph task id, count before), undo it.
_BACKWARD_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, List[Tuple[int, int]]] = weakref.WeakKeyDictionary()


def _current_graph_task() -> int:
    """The id of the autograd graph task this thread is running, -1 outside a backward."""
    return torch._C._current_graph_task_id()


def _forget_backward_layout(module: nn.Module, keep_task: Optional[int] = None) -> None:
    """Undo what a backward that ended without running its final callbacks (it raised) left set."""
    entries = _BACKWARD_LAYOUTS.get(module)
    if not entries or (keep_task is not None and all(t == keep_task for t, _ in entries)):
        return
    module.pace_copies = entries[0][1]
    del _BACKWARD_LAYOUTS[module]


class MultiCopyPass:
    """One forward of a batch that holds ``copies`` copies of each sample (copy ``c`` of sample
    ``b`` at row ``c*B + b``), replay-safe under gradient checkpointing::

        with MultiCopyPass(model, 2) as layout:
            logits = layout.bind(model(torch.cat([x, x])))
        loss_of(logits).backward()

    Inside the block every copy-aware module (see :func:`set_copies`) tiles its masks over the
    copies; after it they are back to what they were. Checkpointing (timm's, or
    ``torch.utils.checkpoint`` reentrant or not) replays the forward of its blocks during the
    backward, after this block has closed: ``bind`` puts the count back in force for exactly the
    backward through the bound output, so a replay, run under the RNG state checkpointing restored,
    draws the masks and the noise of the first pass. (Checkpointing with ``preserve_rng_state=False``
    cannot be exact: its replays draw new randomness.)
    """

    def __init__(self, model: nn.Module, copies: int) -> None:
        self.copies = _check_copies(copies)
        self.modules = _copy_aware_modules(model)
        self._before: Optional[List[int]] = None

    def __enter__(self) -> MultiCopyPass:
        in_backward = _current_graph_task() != -1
        for m in self.modules:
            if not in_backward:
                _forget_backward_layout(m)
        self._before = [m.pace_copies for m in self.modules]
        for m in self.modules:
            m.pace_copies = self.copies
        return self

    def __exit__(self, *exc: object) -> None:
        for m, before in zip(self.modules, self._before or []):
            m.pace_copies = before
        self._before = None

    @torch.compiler.disable
    def bind(self, output: Any) -> Any:
        """Return ``output`` (a tensor, or a tuple, list or mapping holding tensors) after hooking
        each of its tensors that requires grad: the hook runs when the backward through it starts,
        before any node of this pass (every path from the loss into the model passes that tensor),
        which is the moment to put this pass's copy count back for the replays."""
        if isinstance(output, torch.Tensor):
            if output.requires_grad:
                output.register_hook(self._begin_backward)
        elif isinstance(output, (tuple, list)):
            for item in output:
                self.bind(item)
        elif isinstance(output, Mapping):
            for item in output.values():
                self.bind(item)
        return output

    def _begin_backward(self, grad: torch.Tensor) -> None:
        task = _current_graph_task()
        for m in self.modules:
            _forget_backward_layout(m, keep_task=task)
            entries = _BACKWARD_LAYOUTS.setdefault(m, [])
            if entries and m.pace_copies != self.copies:
                raise RuntimeError(
                    f"one backward runs through PACE passes of {m.pace_copies} and {self.copies} copies "
                    "of the same model: forwards replayed by gradient checkpointing could not know "
                    "which count is theirs; call backward on each pass's loss separately"
                )
            entries.append((task, m.pace_copies))
            m.pace_copies = self.copies
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        for m in self.modules:
            entries = _BACKWARD_LAYOUTS.get(m)
            if not entries:
                continue
            _, before = entries.pop()
            m.pace_copies = before
            if not entries:
                del _BACKWARD_LAYOUTS[m]


@contextlib.contextmanager
def reused_masks(model: nn.Module) -> Iterator[nn.Module]:
    """Every pass over a batch inside this block sees the DropPath/dropout masks of the first pass,
    so two passes differ only by what else changed between them (FPA's pre-trained pass)."""
    layers = [m for m in model.modules() if isinstance(m, _SharedMaskLayer)]
    for m in layers:
        m._mask_memo = {}
    try:
        yield model
    finally:
        for m in layers:
            m._mask_memo = None
