"""What :mod:`pace` knows about Hugging Face ``transformers`` models, without importing transformers.

- :func:`is_hf_model` / :func:`find_hf_head`: the task head that ``inject(head="auto")`` trains
  (``classifier`` -- for RoBERTa a module with ``dense`` and ``out_proj``, both trained --,
  ``score``, ``qa_outputs``, ...). A causal LM's ``lm_head`` is the pre-trained output embedding,
  not a new classifier: it stays frozen unless named (``head="lm_head"``).
- :class:`PaceTrainer` (imported from :mod:`pace.hf_trainer` on first use, which needs
  transformers): ``transformers.Trainer`` with a :class:`~pace.PaceCriterion` as its loss.

Noise schedule of decoder and encoder stacks: a layer's block index comes from the numbers in its
path, so ``model.layers.N.*`` (Llama, Phi-3, Qwen) and ``roberta.encoder.layer.N.*`` get index
``N`` and the head the last index. ``inject`` makes no block noise-free by default on these models
(``noise_free_blocks=0``; the ViT rule of a noise-free first block applies to timm's ``blocks``
only): block 0 gets ``sigma``, block ``N`` of ``n - 1`` indices ``sigma * (n - N) / n``, the head
``sigma / n``. Pass ``noise_free_blocks=1`` for the ViT rule.
"""

from __future__ import annotations

from typing import Any, List

import torch.nn as nn

__all__ = [
    "HEAD_NAMES",
    "is_hf_model",
    "find_hf_head",
    "hf_output_layers",
]  # and PaceTrainer, imported on first use

# Task heads of transformers' *For{SequenceClassification,TokenClassification,QuestionAnswering,
# ImageClassification} models, as their attribute names on the model.
HEAD_NAMES = ("classifier", "score", "qa_outputs", "head")


def is_hf_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (checked by class name, so transformers is not imported)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def _linears_under(model: nn.Module, name: str) -> List[str]:
    module = model.get_submodule(name)
    if isinstance(module, nn.Linear):
        return [name]
    return [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def find_hf_head(model: nn.Module) -> List[str]:
    """The linear layers of a Hugging Face model's task head, all of them trained; ``[]`` for a
    causal LM (its ``lm_head`` stays frozen) or a base model without a head. Raises ``ValueError``
    when the model has a task head that is none of :data:`HEAD_NAMES`, rather than leaving a
    randomly initialised classifier frozen."""
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            linears = _linears_under(model, name)
            if linears:
                return linears
    if _has_output_embeddings(model) or type(model).__name__.endswith("Model"):
        return []
    raise ValueError(
        f"head='auto' found no classifier on {type(model).__name__} (looked for a child module named "
        f"one of {HEAD_NAMES}): name the head's layers with head='...' (or a list), or pass head=None "
        "to train none"
    )


def _has_output_embeddings(model: nn.Module) -> bool:
    return bool(hf_output_layers(model))


def hf_output_layers(model: nn.Module) -> List[str]:
    """The name of a language model's output layer (``lm_head``: ``get_output_embeddings()``), or ``[]``."""
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except NotImplementedError:
        output = None
    return [name for name, m in model.named_modules() if output is not None and m is output][:1]


def __getattr__(name: str) -> Any:
    if name == "PaceTrainer":  # needs transformers: imported only when asked for
        from .hf_trainer import PaceTrainer

        return PaceTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
