"""A run folder's files: the lock, atomic writes, checkpoints, random state, weight files (design.md)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file  # pace.io imports it anyway

from ..io import atomic_write

PathLike = Union[str, os.PathLike]

CHECKPOINT_FORMAT = "pace-train-checkpoint"
CHECKPOINT_VERSION = 3  # 2: the data order is a function of (seed, epoch); 3: measured values


class ResumeError(ValueError):
    """A checkpoint that cannot be continued: unreadable, or written by a different run."""


def atomic_save(obj: Any, path: PathLike) -> Path:
    def save(tmp: str) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # torch reports a failed write (e.g. a full disk) this way
            raise OSError(f"cannot write {path} ({short_reason(exc)})") from None

    return atomic_write(path, save)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_weights(model: torch.nn.Module, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """``model``'s state dict as one safetensors file, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def capture_rng(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """The state of every global random stream a step reads (and of ``generator``), as plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    keys = torch.from_numpy(np.asarray(keys, dtype=np.int64))  # weights_only loads tensors, not arrays
    numpy = dict(kind=str(kind), keys=keys, pos=int(pos), has_gauss=int(has_gauss), gauss=float(gauss))
    version, py_state, py_gauss = random.getstate()
    python = dict(version=int(version), state=torch.tensor(py_state, dtype=torch.int64), gauss=py_gauss)
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy, "python": python}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def load_training_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by the trainer; any problem is a :class:`ResumeError`."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file raises many kinds of error
        raise ResumeError(f"cannot read checkpoint {path} ({short_reason(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} is not a pace-train checkpoint")
    if (version := ckpt.get("version")) != CHECKPOINT_VERSION:
        raise ResumeError(f"{path} has checkpoint version {version}, expected {CHECKPOINT_VERSION}")
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
        raise ValueError(f"no file at {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(f"{path} must end in .npz, .safetensors, .pth, .pt or .bin")
    try:
        if suffix == ".safetensors":
            return load_file(str(path))
        return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {path} ({short_reason(exc)})") from None


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """A short one-line account of an exception, for one-line errors."""
    if isinstance(exc, pickle.UnpicklingError):
        if "global" in str(exc).lower():
            return "it pickles objects other than tensors; refused, as torch.load(weights_only=True) does"
        return "not a torch file: corrupt, truncated or another format"
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


RECORDS = tuple("checkpoint.pt metrics.jsonl result.json adapter.safetensors adapter.json curves.png".split())


class RunFolderError(ValueError):
    """The output folder holds another run's records, or another process is writing it."""


def refuse_existing(out_dir: Path, resume: bool, overwrite: bool) -> List[str]:
    """The records in ``out_dir`` a new run would replace; refused unless ``resume`` or ``overwrite``."""
    if resume:
        return []
    found = [name for name in RECORDS if (out_dir / name).exists()]
    if found and not overwrite:
        raise RunFolderError(f"{out_dir} holds the records of a run ({', '.join(found)})")
    return found


@contextlib.contextmanager
def claim(out_dir: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out_dir`` for one run: refuse it when another process holds it, or as
    :func:`refuse_existing` does (overwritten records are deleted first); remove stale temporary files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"{out_dir} is in use by another pace-train run") from None
        for stale in out_dir.glob(".*.tmp"):  # pace.io.atomic_write's names: .<file>.<random>.tmp
            stale.unlink(missing_ok=True)
        for name in refuse_existing(out_dir, resume, overwrite):
            (out_dir / name).unlink()
        try:
            yield
        finally:  # explicitly: a forked DataLoader worker may still hold a copy of the descriptor
            fcntl.flock(lock, fcntl.LOCK_UN)
