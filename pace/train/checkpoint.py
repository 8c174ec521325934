"""Checkpoints: atomic writes, RNG state capture, and reading weight files.

A training checkpoint is one ``torch.save`` file written to a temporary name in the same directory
and renamed over the old one (``os.replace`` is atomic on POSIX), so a run killed mid-write keeps the
previous checkpoint. Everything in it is plain tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)``: no pickled code runs when a checkpoint is read.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..io import atomic_write
from .errors import UsageError

PathLike = Union[str, os.PathLike]

CHECKPOINT_FORMAT = "pace-train-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_save(obj: Any, path: PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# --------------------------------------------------------------------------------------------- RNG
def capture_rng(data_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """The state of every random stream a training step reads, in weights_only-loadable form."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def restore_rng(state: Dict[str, Any], data_generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


# ----------------------------------------------------------------------------------- reading files
def load_training_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by the trainer; any problem is a :class:`UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file raises many kinds of error
        raise UsageError(f"--resume: cannot read checkpoint {path} ({_short(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume: {path} is not a pace-train checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UsageError(
            f"--resume: {path} has checkpoint version {ckpt.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    return ckpt


def _unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    # Training scripts nest the weights under various keys; take the first that holds tensors.
    for key in ("state_dict", "model", "model_state_dict", "module", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("no state dict of tensors inside")
    prefix = "module."  # saved from a DistributedDataParallel wrapper
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--checkpoint: no file at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--checkpoint: cannot read {path} ({_short(exc)})") from None
    raise UsageError(f"--checkpoint: {path} must end in .npz, .safetensors, .pth, .pt or .bin")


def _short(exc: BaseException, limit: int = 160) -> str:
    """A short one-line account of an exception, for one-line errors."""
    if isinstance(exc, pickle.UnpicklingError):
        if "global" in str(exc).lower():
            return "it pickles objects other than tensors; refused, as torch.load(weights_only=True) does"
        return "not a torch file: corrupt, truncated or another format"
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
