"""Saving and loading the trainable adapter tensors (safetensors) with a small JSON config.

A saved adapter is two files, ``NAME.safetensors`` (trainable tensors by their module path and the
names of docs/design.md section 2, e.g. ``blocks.3.attn.qkv.lora_a``) and ``NAME.json`` (the model's
:class:`pace.PaceConfig` as a dict), so it can be re-applied to a fresh copy of the pre-trained
model. Both are written atomically; files written before a config field existed still load.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import PaceConfig
from .inject import inject
from .layers import PaceLinear

__all__ = ["save_adapter", "load_adapter", "atomic_write"]

FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


def _paths(path: PathLike) -> tuple:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, rename it over
    ``path``: a killed process never leaves half a file, and on failure ``path`` is untouched. The
    file gets the mode ``open(path, "w")`` would give it (``mkstemp`` makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # after write: a writer may replace the file (safetensors does)
        with open(tmp, "rb") as f:  # the rename must not become visible before the data
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_adapter(model: nn.Module, path: PathLike) -> Path:
    """Write the trainable tensors of an injected ``model`` and its PACE config; returns the
    ``.safetensors`` path."""
    config = getattr(model, "pace_config", None)
    if not isinstance(config, PaceConfig):
        raise ValueError("save_adapter: model has no PACE adapters (call pace.inject first)")
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    st_path, json_path = _paths(path)
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "tensors": sorted(tensors)}
    atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pace-adapter"}))
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return st_path


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a saved adapter into ``model``, first injecting it as the saved config says when the
    model holds no PACE layers yet (a fresh pre-trained model). Everything is checked before the
    model changes: a file that does not fit raises and leaves ``model`` as it was."""
    st_path, json_path = _paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_adapter: {p} does not exist")
    try:
        meta = json.loads(json_path.read_text())
        saved_config = meta["config"]
        version = meta.get("format_version")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"load_adapter: {json_path} is not a PACE adapter config ({exc})") from exc
    if version != FORMAT_VERSION:
        raise ValueError(
            f"load_adapter: {json_path} has format_version {version!r}; this pace reads {FORMAT_VERSION}"
        )
    try:
        config = PaceConfig.from_dict({"head": None, **saved_config})  # a saved head: the layers it names
    except (ValueError, TypeError) as exc:
        raise ValueError(f"load_adapter: {json_path} holds no valid PACE config ({exc})") from exc
    tensors = _read_adapter_tensors(st_path)
    if not any(isinstance(m, PaceLinear) for m in model.modules()):
        probe = copy.deepcopy(model)  # inject changes the model: try it on a copy first
        inject(probe, config=config)
        _check_fits(probe, tensors, st_path)
        inject(model, config=config)
    _check_fits(model, tensors, st_path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return model


def _read_adapter_tensors(st_path: Path) -> dict:
    try:
        tensors = load_file(str(st_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad files
        raise ValueError(f"load_adapter: cannot read {st_path} ({type(exc).__name__}: {exc})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(
                f"load_adapter: {st_path}: {name} has dtype {t.dtype}, expected a floating-point one"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"load_adapter: {st_path}: {name} holds NaN or inf values")
    return tensors


def _check_fits(model: nn.Module, tensors: dict, st_path: Path) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(
            f"load_adapter: the model has no parameters named {unknown[:5]} (different model or config?)"
        )
    untouched = sorted({n for n, p in params.items() if p.requires_grad} - set(tensors))
    if untouched:
        raise ValueError(
            f"load_adapter: {st_path} holds no tensors for the model's trainable {untouched[:5]} "
            "(saved from a different model or config?)"
        )
    for name, t in tensors.items():
        if params[name].shape != t.shape:
            raise ValueError(
                f"load_adapter: {name} has shape {list(t.shape)} in the file, "
                f"{list(params[name].shape)} in the model"
            )
