"""The PEFT bridge: pace adapters to PEFT's on-disk format and back, PEFT models to pace, refusals."""

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import timm
import torch
import torch.nn as nn

import pace

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5


# ------------------------------------------------------------------------------------------ models
def _vit() -> nn.Module:
    torch.manual_seed(0)  # the same "pre-trained" weights every call
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=32,
        depth=2,
        embed_dim=24,
        num_heads=2,
    )


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _llama() -> nn.Module:  # bias-free linear layers throughout
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config)


@dataclass
class Spec:
    make: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    targets: str  # pace.inject / PEFT regex of the adapted layers
    head: Optional[str]


TINY_MODELS = {
    "vit": Spec(
        _vit, lambda: torch.randn(2, 3, 32, 32), r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1)", "head"
    ),
    "bert": Spec(
        _bert, lambda: torch.randint(0, 40, (2, 7)), r".*\.(query|value|intermediate\.dense)", "classifier"
    ),
    "llama": Spec(_llama, lambda: torch.randint(0, 40, (2, 7)), r".*\.(q_proj|v_proj|up_proj)", None),
}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err < REL_TOL, f"{what}: rel. error {err:.2e}"


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return _logits(model, x)


def _train_grads(model: nn.Module, x: torch.Tensor) -> dict:
    """Gradients of a fixed random projection of the logits, in train mode (sigma 0: no noise)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = _logits(model, x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# pace tensor -> PEFT parameter (inside the adapted layer, adapter "default"), per PEFT form: the test's
# own statement of the mapping table.
PEFT_PARAMS = {
    "LORA": {
        "lora_a": "lora_A.default.weight",
        "lora_b": "lora_B.default.weight",
        "delta_bias": "lora_B.default.bias",
    },
    "HIRA": {"lora_a": "hira_A.default", "lora_b": "hira_B.default"},
    "GLORA": {
        "lora_a": "glora_A.default.Xu",
        "lora_b": "glora_A.default.Xd",
        "bias_scale": "glora_D.default.X",
        "prompt_down": "glora_C.default.Xd",
        "prompt_up": "glora_C.default.Xu",
    },
}


def _peft_name(pace_name: str, peft_type: str) -> Optional[str]:
    """``blocks.0.attn.qkv.lora_a`` -> ``base_model.model.blocks.0.attn.qkv.lora_A.default.weight``;
    the head's ``head.weight`` -> ``base_model.model.head.modules_to_save.default.weight``."""
    layer, _, tensor = pace_name.rpartition(".")
    if tensor in ("weight", "bias"):
        return f"base_model.model.{layer}.modules_to_save.default.{tensor}"
    suffix = PEFT_PARAMS[peft_type].get(tensor)
    return None if suffix is None else f"base_model.model.{layer}.{suffix}"


def _assert_same_grads(pace_grads: dict, peft_grads: dict, peft_type: str) -> None:
    compared = 0
    for name, g in pace_grads.items():
        peft_name = _peft_name(name, peft_type)
        if peft_name is None:  # a pace tensor the PEFT form has no parameter for (HiRA: bias_scale)
            continue
        assert peft_name in peft_grads, f"{peft_name} has no gradient in PEFT"
        _assert_close(g, peft_grads[peft_name], f"gradient of {name}")
        compared += 1
    assert compared >= 3


def _randomize(model: nn.Module, keep_zero=()) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.rpartition(".")[2] not in keep_zero:
                p.copy_(0.3 * torch.randn_like(p))


def _inject(spec: Spec, kind: str, **kw) -> nn.Module:
    return pace.inject(spec.make(), adapter=kind, rank=2, targets=spec.targets, head=spec.head, **kw)


# ----------------------------------------------------------------------------- pace -> PEFT -> pace
PACE_CASES = [
    ("vit", "lora_add", True, "LORA"),
    ("vit", "lora_mul", False, "HIRA"),
    ("vit", "lora_mul", True, "GLORA"),
    ("vit", "lora_mul_vpt_add", True, "GLORA"),
    ("vit", "vpt_add", True, "GLORA"),
    ("bert", "lora_add", True, "LORA"),
    ("bert", "lora_mul", False, "HIRA"),
    ("bert", "lora_mul", True, "GLORA"),
    ("bert", "lora_mul_vpt_add", True, "GLORA"),
    ("llama", "lora_add", True, "LORA"),
    ("llama", "lora_mul", True, "HIRA"),  # bias-free: no bias_scale, so HiRA
]


@pytest.mark.parametrize("model_name, kind, bias_scale, peft_type", PACE_CASES)
def test_pace_to_peft_to_pace(tmp_path, model_name, kind, bias_scale, peft_type):
    spec = TINY_MODELS[model_name]
    model = _inject(spec, kind)
    _randomize(model, keep_zero=() if bias_scale else ("bias_scale",))
    assert pace.save_peft(model, tmp_path) == tmp_path
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    assert config["modules_to_save"] == ([spec.head] if spec.head else None)

    x = spec.inputs()
    peft_model = peft.PeftModel.from_pretrained(spec.make(), tmp_path, is_trainable=True)
    want = _eval_out(model, x)
    _assert_close(_eval_out(peft_model, x), want, "PEFT eval output")
    # PEFT adapts exactly the layers pace adapted (the regex misses timm's patch-embedding conv "proj")
    adapted = {n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "base_layer")}
    head = {spec.head} if spec.head else set()
    assert adapted - head == {n for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)} - head
    _assert_same_grads(_train_grads(model, x), _train_grads(peft_model, x), peft_type)

    back = pace.load_peft(spec.make(), tmp_path, sigma=0.0)
    _assert_close(_eval_out(back, x), want, "pace eval output after the round trip")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in back.named_parameters() if p.requires_grad} == set(trained)
    for name, p in back.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------- PEFT -> pace -> PEFT
def _glora(a_b, c, d_e, **kw):
    return peft.GloraConfig(config_A_B=a_b, config_C=c, config_D_E=d_e, **kw)


PEFT_CASES = [
    ("vit", lambda **kw: peft.LoraConfig(lora_alpha=2, lora_bias=True, **kw), "lora_add"),
    ("vit", lambda **kw: peft.HiraConfig(**kw), "lora_mul"),
    ("vit", lambda **kw: _glora("lora", "none", "vector", **kw), "lora_mul"),
    ("vit", lambda **kw: _glora("lora", "lora", "vector", **kw), "lora_mul_vpt_add"),
    ("bert", lambda **kw: peft.LoraConfig(lora_alpha=2, lora_bias=True, **kw), "lora_add"),
    ("bert", lambda **kw: peft.HiraConfig(**kw), "lora_mul"),
    ("bert", lambda **kw: _glora("lora", "none", "vector", **kw), "lora_mul"),
    ("bert", lambda **kw: _glora("lora", "lora", "vector", **kw), "lora_mul_vpt_add"),
    ("llama", lambda **kw: peft.LoraConfig(lora_alpha=2, **kw), "lora_add"),
    ("llama", lambda **kw: peft.HiraConfig(**kw), "lora_mul"),
]


def _peft_model(spec: Spec, make_config, **kw) -> nn.Module:
    modules_to_save = [spec.head] if spec.head else None
    config = make_config(r=2, target_modules=spec.targets, modules_to_save=modules_to_save, **kw)
    model = peft.get_peft_model(spec.make(), config)
    with torch.no_grad():  # a trained adapter; GLoRA's additive weight B and bias E stay zero
        for name, p in model.named_parameters():
            if p.requires_grad and "glora_B" not in name and "glora_E" not in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("model_name, make_config, kind", PEFT_CASES)
def test_peft_to_pace_to_peft(tmp_path, model_name, make_config, kind):
    spec = TINY_MODELS[model_name]
    peft_model = _peft_model(spec, make_config)
    peft_type = str(peft_model.peft_config["default"].peft_type.value)
    peft_model.save_pretrained(tmp_path / "peft")
    x = spec.inputs()
    want = _eval_out(peft_model, x)
    peft_grads = _train_grads(peft_model, x)

    model = pace.from_peft(peft_model, sigma=0.0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, pace.PaceLinear)}
    assert {m.adapter for n, m in layers.items() if n != spec.head} == {kind}
    assert model.pace_config["head"] == spec.head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_ok = all(n.rpartition(".")[0] in layers for n in trainable)
    assert frozen_ok and not any(
        n.endswith(".weight") and n.rpartition(".")[0] != spec.head for n in trainable
    )
    _assert_close(_eval_out(model, x), want, "pace eval output")
    _assert_same_grads(_train_grads(model, x), peft_grads, peft_type)

    pace.save_peft(model, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(spec.make(), tmp_path / "back")
    _assert_close(_eval_out(again, x), want, "PEFT eval output after the round trip")
    loaded = pace.load_peft(spec.make(), tmp_path / "peft")
    _assert_close(_eval_out(loaded, x), want, "pace.load_peft eval output")


def test_lora_scaling_is_folded_exactly(tmp_path):
    """lora_alpha != r and rsLoRA: the scale goes into lora_b (and the LoRA bias), outputs equal."""
    spec = TINY_MODELS["bert"]
    for config_kw in (dict(lora_alpha=6, lora_bias=True), dict(lora_alpha=5, use_rslora=True)):
        peft_model = _peft_model(spec, lambda _kw=config_kw, **kw: peft.LoraConfig(**kw, **_kw))
        x = spec.inputs()
        want = _eval_out(peft_model, x)
        model = pace.from_peft(peft_model)
        _assert_close(_eval_out(model, x), want, f"pace output with {config_kw}")
        pace.save_peft(model, tmp_path / str(len(config_kw)))
        again = peft.PeftModel.from_pretrained(spec.make(), tmp_path / str(len(config_kw)))
        _assert_close(_eval_out(again, x), want, f"PEFT output after the round trip with {config_kw}")


def test_from_peft_sets_the_pace_schedule_and_loads_back_with_pace_io(tmp_path):
    spec = TINY_MODELS["vit"]
    model = pace.from_peft(_peft_model(spec, lambda **kw: peft.HiraConfig(**kw)), sigma=0.4)
    assert model.blocks[0].attn.qkv.sigma == 0.0  # ViT: the first block is noise-free
    assert model.blocks[1].attn.qkv.sigma == pytest.approx(0.4)
    assert 0 < model.head.sigma < 0.4
    pace.save_adapter(model, tmp_path / "a")
    fresh = pace.load_adapter(_vit(), tmp_path / "a")
    x = spec.inputs()
    torch.testing.assert_close(_eval_out(fresh, x), _eval_out(model, x))


# ---------------------------------------------------------------------------------------- refusals
def test_save_peft_refuses_what_peft_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="rlrr"):
        pace.save_peft(pace.inject(_vit(), adapter="rlrr"), tmp_path)
    with pytest.raises(ValueError, match="no PACE adapters"):
        pace.save_peft(_vit(), tmp_path)
    with pytest.raises(TypeError, match="model"):
        pace.save_peft("model", tmp_path)
    llama = _inject(TINY_MODELS["llama"], "lora_mul_vpt_add")
    with pytest.raises(ValueError, match="without bias"):
        pace.save_peft(llama, tmp_path)
    with pytest.raises(ValueError, match="without bias"):
        pace.save_peft(_inject(TINY_MODELS["llama"], "vpt_add"), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


REFUSED_CONFIGS = [
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv"], lora_dropout=0.1), "lora_dropout"),
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True), "use_dora"),
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv"], bias="all"), "bias='all'"),
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv"], bias="lora_only"), "bias='lora_only'"),
    (lambda: peft.HiraConfig(r=2, target_modules=["qkv"], hira_dropout=0.1), "hira_dropout"),
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv", "patch_embed.proj"]), "Conv2d"),
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv"], rank_pattern={"blocks.1.attn.qkv": 4}), "ranks"),
    (lambda: peft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["norm"]), "modules_to_save"),
    (
        lambda: peft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head", "blocks.1.mlp.fc2"]),
        "several modules",
    ),
    (lambda: _glora("vector", "none", "vector", r=2, target_modules=["qkv"]), "config_A_B"),
    (lambda: _glora("lora", "vector", "vector", r=2, target_modules=["qkv"]), "config_C"),
    (lambda: peft.IA3Config(target_modules=["qkv"], feedforward_modules=[]), "IA3"),
]


@pytest.mark.parametrize("make_config, message", REFUSED_CONFIGS)
def test_from_peft_and_load_peft_refuse_settings_without_exact_form(tmp_path, make_config, message):
    peft_model = peft.get_peft_model(_vit(), make_config())
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        pace.from_peft(peft_model)
    assert any(hasattr(m, "base_layer") for m in peft_model.modules())  # untouched on refusal
    plain = _vit()
    with pytest.raises(ValueError, match=message):
        pace.load_peft(plain, tmp_path)
    assert not any(hasattr(m, "base_layer") or isinstance(m, pace.PaceLinear) for m in plain.modules())


def test_from_peft_refuses_other_states(tmp_path):
    spec = TINY_MODELS["bert"]
    with pytest.raises(TypeError, match="PeftModel"):
        pace.from_peft(_bert())
    two = _peft_model(spec, lambda **kw: peft.LoraConfig(**kw))
    two.add_adapter("second", peft.LoraConfig(r=2, target_modules=spec.targets))
    with pytest.raises(ValueError, match="several adapters"):
        pace.from_peft(two)
    merged = _peft_model(spec, lambda **kw: peft.LoraConfig(**kw))
    merged.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        pace.from_peft(merged)
    embedding = peft.get_peft_model(
        _bert(), peft.LoraConfig(r=2, target_modules=["word_embeddings", "query"])
    )
    with pytest.raises(ValueError, match="Embedding"):
        pace.from_peft(embedding)
    glora = _peft_model(spec, lambda **kw: _glora("lora", "lora", "vector", **kw))
    with torch.no_grad():
        glora.base_model.model.bert.encoder.layer[0].attention.self.query.glora_B["default"].Xd.fill_(0.1)
    with pytest.raises(ValueError, match=r"glora_B is nonzero"):
        pace.from_peft(copy.deepcopy(glora))
    glora = _peft_model(spec, lambda **kw: _glora("lora", "none", "vector", **kw))
    with torch.no_grad():
        glora.base_model.model.bert.encoder.layer[1].attention.self.value.glora_E["default"].X.fill_(0.1)
    with pytest.raises(ValueError, match=r"glora_E is nonzero"):
        pace.from_peft(glora)


def test_bad_pace_arguments_leave_the_peft_model_and_the_model_untouched(tmp_path):
    spec = TINY_MODELS["vit"]
    peft_model = _peft_model(spec, lambda **kw: peft.HiraConfig(**kw))
    peft_model.save_pretrained(tmp_path)
    for bad in (dict(sigma=-1.0), dict(noise="uniform"), dict(schedule="linear"), dict(noise_shape="batch")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pace.from_peft(peft_model, **bad)
        assert any(hasattr(m, "base_layer") for m in peft_model.modules())
        plain = _vit()
        with pytest.raises(ValueError, match=next(iter(bad))):
            pace.load_peft(plain, tmp_path, **bad)
        assert not any(hasattr(m, "base_layer") or isinstance(m, pace.PaceLinear) for m in plain.modules())


def test_from_peft_refuses_fan_in_fan_out():
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    gpt2 = transformers.GPT2LMHeadModel(config)
    peft_model = peft.get_peft_model(
        gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        pace.from_peft(peft_model)


def test_load_peft_needs_a_peft_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pace.load_peft(_vit(), tmp_path)
    pace.save_peft(_inject(TINY_MODELS["vit"], "lora_add"), tmp_path)
    with pytest.raises(ValueError, match="already holds PaceLinear"):
        pace.load_peft(_inject(TINY_MODELS["vit"], "lora_add"), tmp_path)


def test_missing_peft_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'pace\[peft\]'"):
        pace.save_peft(_inject(TINY_MODELS["vit"], "lora_add"), tmp_path)
    with pytest.raises(ImportError, match=r"pace\[peft\]"):
        pace.load_peft(_vit(), tmp_path)


def test_import_pace_works_without_peft():
    code = "import sys; sys.modules['peft'] = None; import pace; print(pace.save_peft.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "save_peft"


def test_a_peft_model_runs_on_the_fused_kernels(device):
    """from_peft's layers take the Triton path (the interpreter without a GPU) with the reference's
    outputs and gradients."""
    spec = TINY_MODELS["vit"]
    model = pace.from_peft(
        _peft_model(spec, lambda **kw: _glora("lora", "lora", "vector", **kw)), backend="torch"
    )
    model.to(device)
    x = spec.inputs().to(device)
    want = _train_grads(model, x)
    want_out = _eval_out(model, x)
    pace.set_backend(model, "triton")
    got = _train_grads(model, x)
    _assert_close(_eval_out(model, x), want_out, "fused eval output")
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)


class _Toy(nn.Module):
    """One linear layer with a bias, one without, and a head called ``fc`` (a suffix of ``mlp.fc``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6, bias=False)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.proj(self.mlp.fc(x)))


def test_more_refusals(tmp_path):
    toy = pace.inject(_Toy(), adapter="lora_add", rank=2, targets=["mlp.fc", "proj"], head="fc")
    with pytest.raises(ValueError, match="suffix"):  # PEFT's modules_to_save would wrap mlp.fc too
        pace.save_peft(toy, tmp_path)
    with pytest.raises(TypeError, match="model"):
        pace.load_peft("model", tmp_path)

    mixed = peft.get_peft_model(
        _Toy(), _glora("lora", "lora", "vector", r=2, target_modules=["mlp.fc", "proj"])
    )
    with pytest.raises(ValueError, match="mix of layers with and without bias"):
        pace.from_peft(mixed)
    bias_free = peft.get_peft_model(_Toy(), _glora("none", "lora", "none", r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="without bias"):
        pace.from_peft(bias_free)

    llama = _peft_model(
        TINY_MODELS["llama"], lambda **kw: peft.LoraConfig(lora_bias=True, **kw)
    )  # biases randomised
    with pytest.raises(ValueError, match="lora_B is nonzero"):
        pace.from_peft(llama)
    tokens = peft.get_peft_model(
        _bert(), peft.LoraConfig(r=2, target_modules=["query"], trainable_token_indices=[1])
    )
    with pytest.raises(ValueError, match="trainable_token_indices"):
        pace.from_peft(tokens)


def test_glora_on_bias_free_layers_is_lora_mul():
    """GLoRA has no C, D, E where a layer has no bias, so on a bias-free model it is exactly lora_mul."""
    spec = TINY_MODELS["llama"]
    peft_model = _peft_model(spec, lambda **kw: _glora("lora", "lora", "vector", **kw))
    x = spec.inputs()
    want = _eval_out(peft_model, x)
    model = pace.from_peft(peft_model)
    assert model.pace_config["adapter"] == "lora_mul"
    _assert_close(_eval_out(model, x), want, "pace output")
