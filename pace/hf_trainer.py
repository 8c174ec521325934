"""``transformers.Trainer`` with a PACE objective (needs transformers: ``pip install pace[hf]``).

>>> crit = pace.PaceCriterion(mode="pace", lam=1.0, shift_labels=True)   # causal LM
>>> trainer = PaceTrainer(model=model, args=args, train_dataset=ds, pace_criterion=crit)
>>> trainer.train()

Training steps use the criterion (the copies, the consistency); evaluation steps score the model's
own logits with the criterion's classification loss alone. For ``mode="fast"`` the dataset gives
each example its dataset index in a column named ``index_column`` (``"pace_index"``), which this
Trainer keeps through ``remove_unused_columns`` and hands to the criterion instead of the model.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from transformers import Trainer

from .losses import PaceCriterion, output_logits

__all__ = ["PaceTrainer"]


class PaceTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is ``pace_criterion(model, batch, labels, ...)``.

    ``labels`` come from the batch's ``labels`` entry (the default collators name them so); with
    ``mode="fast"`` the batch's ``index_column`` holds the dataset indices. In a multi-process run
    PACE_fast's bank sees only this process's logits: use ``pace-train`` or your own loop there.
    """

    def __init__(
        self, *args: Any, pace_criterion: PaceCriterion, index_column: str = "pace_index", **kwargs: Any
    ) -> None:
        if not isinstance(pace_criterion, PaceCriterion):
            raise TypeError(
                f"pace_criterion must be a pace.PaceCriterion, got {type(pace_criterion).__name__}"
            )
        if not isinstance(index_column, str) or not index_column:
            raise ValueError(f"index_column must be a non-empty column name, got {index_column!r}")
        self.pace_criterion = pace_criterion
        self.index_column = index_column
        super().__init__(*args, **kwargs)
        # The criterion returns a per-batch mean and takes no num_items_in_batch: the Trainer must
        # divide it by the gradient accumulation steps (transformers 4.46+ and 5.x read these two).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.index_column not in self._signature_columns:  # keep the index through remove_unused_columns
            self._signature_columns.append(self.index_column)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Any]]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        index = inputs.pop(self.index_column, None)
        if labels is None:
            raise ValueError(
                "PaceTrainer needs a 'labels' entry in each batch (per-sample [B] or per-token [B, T])"
            )
        crit = self.pace_criterion
        if model.training:
            if crit.mode == "fast" and index is None:
                raise ValueError(
                    "mode='fast' needs the dataset index of each example: add a column "
                    f"{self.index_column!r} "
                    "(e.g. dataset.map(lambda ex, i: {'pace_index': i}, with_indices=True))"
                )
            out = crit(model, inputs, labels, index=index, step=self.state.global_step)
            return (out.loss, {"logits": out.logits}) if return_outputs else out.loss
        outputs = model(**inputs)
        loss = crit.task_loss(output_logits(outputs), labels)
        return (loss, outputs) if return_outputs else loss
