"""pace: fast PACE fine-tuning.

PACE (NeurIPS 2024) multiplies each adapter's output by per-sample noise ``N(1, sigma^2)`` and
adds a consistency loss between noisy copies of the network. This package provides the drop-in
layers (:class:`PaceLinear`, one subclass per adapter kind), their configuration
(:class:`PaceConfig`) and injection into timm models (:func:`inject`), the noise schedule,
the PACE / PACE_fast / PACE_lazy_half / FPA objectives (:class:`PaceCriterion`), merge for
inference (:func:`merge`), adapter I/O, the bridge to Hugging Face PEFT (:func:`save_peft`,
:func:`load_peft`, :func:`from_peft`) and the paper's held-out diagnostics (:func:`heldout_grad_norm`,
:func:`heldout_fp_distance`); the fused kernels live in :mod:`pace_kernels`.
"""

from .config import ADAPTER_KINDS, SCHEDULES, PaceConfig
from .diagnostics import HeldoutDiagnostics, heldout_diagnostics, heldout_fp_distance, heldout_grad_norm
from .dropout import MultiCopyPass, SharedDropout, SharedDropPath, set_copies
from .inject import (
    adapters_disabled,
    block_indices,
    fp_distance,
    inject,
    merge,
    schedule_factors,
    set_backend,
    set_sigma,
    trainable_parameters,
)
from .io import load_adapter, save_adapter
from .layers import (
    LoraAddLinear,
    LoraMulLinear,
    LoraMulVptAddLinear,
    PaceHead,
    PaceLinear,
    RlrrLinear,
    SSFNorm,
    VptAddLinear,
    layer_class,
)
from .losses import MODES, PaceCriterion, PaceOutput, consistency
from .noise import NOISE_KINDS, draw_noise
from .peft_bridge import from_peft, load_peft, save_peft

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_KINDS",
    "MODES",
    "NOISE_KINDS",
    "SCHEDULES",
    "PaceConfig",
    "PaceLinear",
    "PaceHead",
    "LoraAddLinear",
    "LoraMulLinear",
    "VptAddLinear",
    "LoraMulVptAddLinear",
    "RlrrLinear",
    "layer_class",
    "SSFNorm",
    "SharedDropPath",
    "SharedDropout",
    "MultiCopyPass",
    "PaceCriterion",
    "PaceOutput",
    "consistency",
    "inject",
    "merge",
    "set_sigma",
    "set_backend",
    "set_copies",
    "trainable_parameters",
    "adapters_disabled",
    "fp_distance",
    "HeldoutDiagnostics",
    "heldout_diagnostics",
    "heldout_grad_norm",
    "heldout_fp_distance",
    "block_indices",
    "schedule_factors",
    "save_adapter",
    "load_adapter",
    "draw_noise",
    "save_peft",
    "load_peft",
    "from_peft",
]
