"""Library API input checks (issue 12 item 11): each bad input is a ValueError/TypeError naming the
argument or file, raised before anything changes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import pace
from pace.layers import PaceLinear


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _saved_adapter(tmp_path):
    model = pace.inject(_mlp(), adapter="lora_add", rank=2, sigma=0.5)
    pace.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert not any(isinstance(m, PaceLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "damage, error, words",
    [
        ("int32", TypeError, "dtype"),
        ("nan", ValueError, "NaN"),
        ("version", ValueError, "format_version 99"),
        ("garbage", ValueError, "cannot read"),
        ("truncated", ValueError, "cannot read"),
        ("extra", ValueError, "no parameters named"),
    ],
)
def test_load_adapter_refuses_bad_files_and_leaves_the_model_alone(tmp_path, damage, error, words):
    path = _saved_adapter(tmp_path)
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    from safetensors.torch import load_file

    tensors = load_file(st)
    first = sorted(tensors)[-1]
    if damage == "int32":
        tensors[first] = tensors[first].to(torch.int32)
    elif damage == "nan":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    elif damage == "extra":
        tensors["0.not_a_parameter"] = torch.zeros(2)
    if damage in ("int32", "nan", "extra"):
        save_file(tensors, st)
    elif damage == "version":
        meta = json.loads(js.read_text())
        meta["format_version"] = 99
        js.write_text(json.dumps(meta))
    elif damage == "garbage":
        st.write_bytes(b"not a safetensors file")
    else:
        st.write_bytes(st.read_bytes()[:40])
    model = _mlp()
    before = _state(model)
    with pytest.raises(error, match=words) as info:
        pace.load_adapter(model, path)
    if damage in ("garbage", "truncated", "int32", "nan"):
        assert str(st) in str(info.value)
    _assert_untouched(model, before)


@pytest.mark.parametrize(
    "index, error, words",
    [
        ([-1, 0], ValueError, "0..3"),
        ([0, 4], ValueError, "0..3"),
        ([0.0, 1.5], TypeError, "integers"),
    ],
)
def test_fast_criterion_refuses_bad_indices_before_touching_the_bank(index, error, words):
    model = pace.inject(_mlp(), adapter="lora_add", rank=2, sigma=0.5)
    crit = pace.PaceCriterion("fast", lam=1.0, num_samples=4, num_classes=3)
    crit.history_bank.fill_(7.0)
    with pytest.raises(error, match=words):
        crit(model, torch.randn(2, 8), torch.tensor([0, 1]), index=torch.tensor(index))
    assert torch.all(crit.history_bank == 7.0)


def test_inject_names_a_bad_regex():
    with pytest.raises(ValueError, match=r"targets='\(' is not a valid regular expression"):
        pace.inject(_mlp(), adapter="lora_add", rank=2, targets="(")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_setting_a_bad_sigma_on_a_layer_is_refused(bad):
    model = pace.inject(_mlp(), adapter="lora_add", rank=2, sigma=0.5)
    layer = next(m for m in model.modules() if isinstance(m, PaceLinear))
    with pytest.raises(ValueError, match="sigma"):
        layer.sigma = bad
    assert layer.sigma == 0.5
    layer.sigma = 1.0
    assert layer.sigma == 1.0
