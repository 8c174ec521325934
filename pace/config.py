"""One PACE configuration: what :func:`pace.inject` takes, checked in one place.

:class:`PaceConfig` is what ``inject`` builds from its keyword arguments (or takes as ``config=``),
what an injected model carries as ``model.pace_config``, what a saved adapter's JSON holds, and
where the trainer's CLI reads its lists of choices. The per-layer options (``rank``, ``sigma``,
``noise``, ``noise_on``, ``noise_shape``, ``backend``) are checked by :func:`check_layer_options`,
the one check :class:`pace.PaceLinear` runs too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import pace_kernels

from .noise import check_noise_kind

__all__ = [
    "PaceConfig",
    "ADAPTER_KINDS",
    "SCHEDULES",
    "NOISE_PLACEMENTS",
    "NOISE_SHAPES",
    "DEFAULT_ADAPTER",
    "check_layer_options",
    "check_sigma",
]

# The adapter kinds of docs/design.md section 2; pace.layers registers one layer class for each.
ADAPTER_KINDS = ("lora_add", "lora_mul", "vpt_add", "lora_mul_vpt_add", "rlrr")
DEFAULT_ADAPTER = "lora_mul_vpt_add"
SCHEDULES = ("pace", "constant", "increasing")
NOISE_PLACEMENTS = ("delta", "output")
NOISE_SHAPES = ("sample", "token")

Targets = Union[None, str, Sequence[str]]
Heads = Union[None, str, Sequence[str]]


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_sigma(sigma: object) -> float:
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float))
        or not math.isfinite(sigma)
        or sigma < 0
    ):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_layer_options(
    *, rank: object, sigma: object, noise: object, noise_on: object, noise_shape: object, backend: object
) -> float:
    """The options every PACE layer takes (``rank=None``: a kind without a rank); returns ``sigma``
    as a float."""
    if rank is not None:
        check_positive_int("rank", rank)
    check_noise_kind(noise)
    _check_choice("noise_on", noise_on, NOISE_PLACEMENTS)
    _check_choice("noise_shape", noise_shape, NOISE_SHAPES)
    pace_kernels.check_backend(backend)
    return check_sigma(sigma)


def _check_targets(targets: Targets) -> Targets:
    if targets is None:
        return None
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"targets={targets!r} is not a valid regular expression ({exc})") from None
        return targets
    names = list(targets) if isinstance(targets, Sequence) else None
    if names is None or not all(isinstance(t, str) for t in names):
        raise TypeError(f"targets must be None, a regex string or a list of module names, got {targets!r}")
    return names


def _check_head(head: Heads) -> Heads:
    if head is None or isinstance(head, str):
        return head
    names = list(head) if isinstance(head, Sequence) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"head must be 'auto', None, a module name or a list of names, got {head!r}")
    return names


@dataclasses.dataclass(frozen=True)
class PaceConfig:
    """The PACE setup of a model (the arguments of :func:`pace.inject`, docs/design.md sections 2, 4).

    ``adapter``: one of :data:`ADAPTER_KINDS`; ``rank``: its rank (unused by ``rlrr``); ``sigma``:
    the base noise std; ``targets``: the linear layers to adapt (None: every one; a string: a regex
    matched against the full name; a list: names or their last dotted parts); ``schedule``: the
    depth schedule of sigma (:data:`SCHEDULES`); ``noise_free_blocks``: noise-free block indices at
    the bottom (None: inject picks 1 for ViT-style ``blocks``, else 0); ``head``: the trainable noisy
    classifier (``"auto"``, None, a name or a list); ``noise``, ``noise_on``, ``noise_shape``: the
    noise and where it goes; ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.

    On an injected model (``model.pace_config``) ``targets``, ``noise_free_blocks`` and ``head``
    hold what inject resolved (the head's layer names). The config is frozen, so it stays valid:
    ``dataclasses.replace(config, rank=4)`` makes a changed (and checked) copy. Read fields as
    attributes; ``config["rank"]`` also works, as it did when ``model.pace_config`` was a dict.
    """

    adapter: str = DEFAULT_ADAPTER
    rank: int = 10
    sigma: float = 0.0
    targets: Targets = None
    schedule: str = "pace"
    noise_free_blocks: Optional[int] = None
    head: Heads = "auto"
    noise: str = "gaussian"
    noise_on: str = "delta"
    noise_shape: str = "sample"
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("adapter", self.adapter, ADAPTER_KINDS)
        sigma = check_layer_options(
            rank=self.rank,
            sigma=self.sigma,
            noise=self.noise,
            noise_on=self.noise_on,
            noise_shape=self.noise_shape,
            backend=self.backend,
        )
        _check_choice("schedule", self.schedule, SCHEDULES)
        blocks = self.noise_free_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
            raise ValueError(f"noise_free_blocks must be None or an int >= 0, got {blocks!r}")
        # normalised values (a float sigma, lists rather than tuples) set past the frozen dataclass
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "targets", _check_targets(self.targets))
        object.__setattr__(self, "head", _check_head(self.head))

    def layer_options(self) -> Dict[str, Any]:
        """The keyword arguments of :class:`pace.PaceLinear` this config sets (all but ``sigma``,
        which inject scales per layer by the depth schedule)."""
        return dict(
            rank=self.rank,
            noise=self.noise,
            noise_on=self.noise_on,
            noise_shape=self.noise_shape,
            backend=self.backend,
        )

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of every field (lists, not tuples)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PaceConfig:
        """The config a dict describes; fields it lacks take their defaults (adapter files written
        before a field existed still load), unknown keys are an error."""
        if not isinstance(values, Mapping):
            raise TypeError(f"PaceConfig.from_dict takes a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"PaceConfig has no fields {unknown} (known: {sorted(known)})")
        return cls(**values)

    def __getitem__(self, name: str) -> Any:
        """``config["rank"]``: read access by field name, for code written against the old dict."""
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(name)
        return getattr(self, name)
