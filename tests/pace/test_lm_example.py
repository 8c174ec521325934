"""examples/lm_docstrings.py runs end to end at its tiny size (the full size takes minutes on CPU)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm_docstrings.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("lm_docstrings", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_docstring_corpus_splits_modules_disjointly():
    example = _load_example()
    first, second = example.stdlib_docstrings(max_modules=4)
    assert first and second and not set(first) & set(second)
    ids, mask = example.encode(["abc", "x" * 100], seq_len=8)
    assert ids[0, :4].tolist() == [97, 98, 99, example.EOS] and mask[0].tolist() == [1] * 4 + [0] * 4
    assert mask[1].all() and ids[1, -1] == example.EOS


def test_lm_example_runs_tiny():
    lines = []
    results = _load_example().run("tiny", log=lines.append)
    assert set(results) == {"lora", "lora+pace"}
    assert all(math.isfinite(v) for losses in results.values() for v in losses)
    assert any("held-out loss" in line for line in lines)
