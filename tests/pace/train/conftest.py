"""Fixtures for the trainer tests: tiny image folders in both layouts and an in-process runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, NamedTuple

import numpy as np
import pytest

# A one-block ViT at 16x16 in 8x8 patches: a training step takes milliseconds on a CPU.
TINY_VIT = [
    "--model",
    "vit_tiny_patch16_224",
    "--img-size",
    "16",
    "--model-kwargs",
    json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}),
]
# The built-in default shrunk for tests: 1 pre-training epoch, 3 shots per digit (15 images).
SMALL_DEFAULT = [
    "--pretrain-epochs",
    "1",
    "--shots",
    "3",
    "--batch-size",
    "5",
    "--eval-every",
    "1",
    "--rank",
    "2",
    "--repeats",
    "1",
    "--no-progress",
]
REPO_ROOT = Path(__file__).resolve().parents[3]


class Result(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def run_main(capsys):
    """Run ``pace-train`` in this process (no interpreter start-up) and capture its output."""
    from pace.train import main

    def run(*argv: str) -> Result:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def subprocess_env() -> dict:
    """Environment for child processes that import this checkout's ``pace``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _png(path: Path, value: int, rng: np.random.Generator) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(rng.normal(value, 30, size=(12, 10, 3)), 0, 255).astype(
        np.uint8
    )  # not square: resize works
    Image.fromarray(pixels).save(path)


@pytest.fixture
def noah_dir(tmp_path) -> Path:
    """A NOAH folder: images/ plus train800.txt, val200.txt, train800val200.txt, test.txt (2 classes)."""
    root = tmp_path / "noah"
    rng = np.random.default_rng(0)
    lists = {"train800": 6, "val200": 2, "test": 4}
    lines_all: List[str] = []
    for split, n in lists.items():
        lines = []
        for i in range(n):
            label = i % 2
            rel = f"images/{split}/{i:06d}.png"
            _png(root / rel, 60 + 120 * label, rng)
            lines.append(f"{rel} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        if split != "test":
            lines_all += lines
    (root / "train800val200.txt").write_text("\n".join(lines_all) + "\n")
    return root


@pytest.fixture
def imagefolder_dir(tmp_path) -> Path:
    """An ImageFolder tree: train/<class>/*.png and val/<class>/*.png (3 classes)."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 1)):
        for c, name in enumerate(("cat", "dog", "owl")):
            for i in range(n):
                _png(root / split / name / f"{i}.png", 40 + 80 * c, rng)
    return root


def python() -> str:
    return sys.executable
