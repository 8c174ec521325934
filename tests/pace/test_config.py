"""PaceConfig (one config, checked in one place) and the layer class of each adapter kind (issue 11)."""

import copy
import dataclasses
import json
import pickle

import pytest
import torch
import torch.nn as nn

import pace
from pace.train.config import ADAPTERS, PACE_MODES

PARAMETER_NAMES = {  # the saved-adapter format: these names must not change
    "lora_add": ["lora_a", "lora_b", "delta_bias"],
    "lora_mul": ["lora_a", "lora_b", "bias_scale"],
    "vpt_add": ["prompt_down", "prompt_up"],
    "lora_mul_vpt_add": ["lora_a", "lora_b", "prompt_down", "prompt_up", "bias_scale"],
    "rlrr": ["scale_left", "scale_right", "shift"],
    "head": ["weight", "bias"],
}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))


# --------------------------------------------------------------------------------------- PaceConfig
@pytest.mark.parametrize(
    "field, value, error",
    [
        ("adapter", "head", ValueError),
        ("adapter", "lora", ValueError),
        ("rank", 0, ValueError),
        ("rank", True, ValueError),
        ("sigma", float("nan"), ValueError),
        ("sigma", -0.1, ValueError),
        ("schedule", "linear", ValueError),
        ("noise_free_blocks", -1, ValueError),
        ("noise", "uniform", ValueError),
        ("noise_on", "input", ValueError),
        ("noise_shape", "channel", ValueError),
        ("backend", "cuda", ValueError),
        ("targets", "qkv(", ValueError),
        ("targets", 3, TypeError),
        ("head", ["head", 1], TypeError),
    ],
)
def test_config_refuses_bad_fields_by_name(field, value, error):
    with pytest.raises(error, match=field):
        pace.PaceConfig(**{field: value})
    with pytest.raises(error, match=field):  # inject's keywords go through the same check
        pace.inject(_mlp(), **{field: value})
    model = _mlp()
    assert not any(isinstance(m, pace.PaceLinear) for m in model.modules())


def test_config_round_trips_through_a_dict_and_reads_like_the_old_dict():
    config = pace.PaceConfig(adapter="lora_add", rank=3, sigma=1, targets=("0", "2"), head=None)
    assert config.sigma == 1.0 and isinstance(config.sigma, float) and config.targets == ["0", "2"]
    assert pace.PaceConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config["rank"] == 3 and config["adapter"] == "lora_add"
    with pytest.raises(KeyError):
        config["lam"]
    with pytest.raises(ValueError, match="lam"):
        pace.PaceConfig.from_dict({"adapter": "lora_add", "lam": 1.0})
    assert pace.PaceConfig.from_dict({"rank": 4}) == pace.PaceConfig(rank=4)
    with pytest.raises(dataclasses.FrozenInstanceError):  # checked once, so it cannot change unchecked
        config.rank = 0
    with pytest.raises(ValueError, match="rank"):
        dataclasses.replace(config, rank=0)


def test_inject_takes_a_config_and_the_model_keeps_the_resolved_one():
    config = pace.PaceConfig(
        adapter="lora_add", rank=2, sigma=0.5, schedule="constant", head=["2"], backend="torch"
    )
    torch.manual_seed(0)
    by_config = pace.inject(_mlp(), config=config)
    torch.manual_seed(0)
    by_keywords = pace.inject(_mlp(), "lora_add", 2, 0.5, schedule="constant", head=["2"], backend="torch")
    for model in (by_config, by_keywords):
        assert isinstance(model.pace_config, pace.PaceConfig)
        assert model.pace_config == dataclasses.replace(config, head="2", noise_free_blocks=0)
    assert config.head == ["2"]  # the caller's config is not changed
    assert type(by_config[2]) is pace.PaceHead and type(by_config[0]) is pace.LoraAddLinear
    for a, b in zip(by_config.state_dict().values(), by_keywords.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="config= or the keyword arguments"):
        pace.inject(_mlp(), rank=4, config=config)
    with pytest.raises(TypeError, match="PaceConfig"):
        pace.inject(_mlp(), config={"adapter": "lora_add"})


def test_set_sigma_and_set_backend_keep_the_config_current():
    model = pace.inject(_mlp(), adapter="lora_add", rank=2, sigma=0.5, schedule="constant")
    pace.set_sigma(model, 0.25)
    pace.set_backend(model, "torch")
    assert model.pace_config.sigma == 0.25 and model.pace_config.backend == "torch"
    assert all(m.sigma == 0.25 for m in model.modules() if isinstance(m, pace.LoraAddLinear))


def test_adapter_saved_before_the_config_had_a_backend_still_loads(tmp_path):
    pretrained = _mlp()
    model = pace.inject(copy.deepcopy(pretrained), adapter="lora_mul", rank=2, sigma=0.3)
    with torch.no_grad():
        for p in pace.trainable_parameters(model):
            p.normal_()
    pace.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["config"] == model.pace_config.to_dict()
    del meta["config"]["backend"]  # the JSON of the dict-config releases
    (tmp_path / "a.json").write_text(json.dumps(meta))
    loaded = pace.load_adapter(copy.deepcopy(pretrained), tmp_path / "a")
    assert loaded.pace_config == model.pace_config
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    meta["config"]["rank"] = 0
    (tmp_path / "a.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rank"):
        pace.load_adapter(_mlp(), tmp_path / "a")


def test_the_trainer_lists_are_the_library_lists():
    assert sorted(ADAPTERS) == sorted(pace.ADAPTER_KINDS) and ADAPTERS[0] == pace.PaceConfig.adapter
    assert PACE_MODES == pace.MODES


# ---------------------------------------------------------------------------------- layer classes
@pytest.mark.parametrize("kind", [*pace.ADAPTER_KINDS, "head"])
def test_each_kind_is_its_own_class_with_the_old_parameter_names(kind):
    layer = pace.PaceLinear(5, 4, adapter=kind, rank=3)
    cls = pace.layer_class(kind)
    assert type(layer) is cls and isinstance(layer, pace.PaceLinear) and layer.adapter == kind
    assert list(layer.adapter_parameters()) == PARAMETER_NAMES[kind]
    direct = cls(5, 4, rank=3)  # the class itself builds the same layer
    assert type(direct) is cls and list(direct.adapter_parameters()) == PARAMETER_NAMES[kind]
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is cls
        assert all(
            torch.equal(a, b) for a, b in zip(clone.state_dict().values(), layer.state_dict().values())
        )
    # the attributes pace.inject sets are declared, with the values of a layer outside any schedule
    assert layer.block_index is None and layer.noise_scale == 1.0 and layer.adapter_enabled


def test_the_registry_holds_every_kind_and_refuses_others():
    assert {k: pace.layer_class(k).adapter for k in pace.ADAPTER_KINDS} == {k: k for k in pace.ADAPTER_KINDS}
    assert type(pace.PaceLinear(5, 4)) is pace.LoraMulVptAddLinear  # the default kind
    with pytest.raises(ValueError, match="adapter must be one of"):
        pace.PaceLinear(5, 4, adapter="dora")
    with pytest.raises(ValueError, match="adapter='lora_mul'"):
        pace.LoraAddLinear(5, 4, adapter="lora_mul")


def test_from_linear_allocates_no_stand_in_weight():
    """The wrapped layer's weight is shared, so no D x K tensor may be made (or initialised) for it."""
    d, k = 48, 40
    linear = nn.Linear(k, d)

    class RecordFullSizeTensors(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == (d, k) and out.device.type != "meta":
                if out.data_ptr() != linear.weight.data_ptr():
                    self.made.append(getattr(func, "__name__", str(func)))
            return out

    for kind in [*pace.ADAPTER_KINDS, "head"]:
        with RecordFullSizeTensors() as mode:
            layer = pace.PaceLinear.from_linear(linear, adapter=kind, rank=2)
        assert mode.made == [], (kind, mode.made)
        assert layer.weight is linear.weight and layer.bias is linear.bias
        assert all(p.device.type == "cpu" for p in layer.parameters())
        assert layer.weight.requires_grad == (kind == "head")
