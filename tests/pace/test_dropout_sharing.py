"""Every stochastic layer shares its mask across the PACE copies, or inject refuses it (issue 10,
item 2): at sigma 0 the copies of a sample are identical, attention dropout included."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import pace


def _force_fused_attention(model: nn.Module) -> None:
    """timm picks fused attention by torch version and environment: test the fused path always."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True


def _copies_differ_by(model: nn.Module, x: torch.Tensor) -> float:
    """Largest difference between the two copies' outputs of one two-copy pass."""
    model.train()
    pace.set_copies(model, 2)
    try:
        with torch.no_grad():
            out = model(torch.cat([x, x]))
    finally:
        pace.set_copies(model, 1)
    out = getattr(out, "logits", out)
    first, second = out.chunk(2)
    return (first - second).abs().max().item()


def _perturb_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for p in pace.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", dict(img_size=32, embed_dim=32, num_heads=2, depth=2, proj_drop_rate=0.2)),
        (
            "swin_tiny_patch4_window7_224",
            dict(img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=7),
        ),
    ],
)
def test_timm_attention_dropout_is_shared_at_sigma_zero(name, kwargs):
    model = timm.create_model(
        name, pretrained=False, num_classes=3, drop_rate=0.2, attn_drop_rate=0.4, drop_path_rate=0.3, **kwargs
    )
    _force_fused_attention(model)
    x = torch.randn(3, 3, kwargs["img_size"], kwargs["img_size"])
    assert _copies_differ_by(model, x) > 0  # fused attention draws its dropout per row
    pace.inject(model, adapter="lora_mul_vpt_add", rank=3, sigma=0.0)
    _perturb_adapters(model)
    out = pace.PaceCriterion("pace")(model, x, torch.tensor([0, 1, 2]))
    assert out.consistency.item() == 0.0
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # the dropout is live
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attn and not any(m.fused_attn for m in attn)
    assert all(isinstance(m.attn_drop, pace.SharedDropout) for m in attn)


def test_timm_attention_without_dropout_keeps_its_fused_path():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, num_heads=2, depth=1)
    _force_fused_attention(model)
    pace.inject(model, rank=2)
    assert model.blocks[0].attn.fused_attn is True


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_p = 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), self.drop_p, self.training)


class _WithDropout2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout2d(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


@pytest.mark.parametrize(
    "build, match",
    [
        (
            _FunctionalDropout,
            r"module '_FunctionalDropout' .*drop_p=0.3.*Fix: set _FunctionalDropout.drop_p = 0",
        ),
        (
            lambda: nn.Sequential(_WithDropout2d()),
            r"module '0.drop' is a Dropout2d with p=0.2.*set 0.drop.p = 0",
        ),
        (
            lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, patch_drop_rate=0.25),
            r"module 'patch_drop' is a PatchDropout with prob=0.25",
        ),
    ],
)
def test_dropout_that_cannot_be_shared_is_refused_before_the_model_changes(build, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        pace.inject(model, rank=2)
    assert not any(isinstance(m, (pace.PaceLinear, pace.SharedDropout)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------ Hugging Face
def _hf_models():
    transformers = pytest.importorskip("transformers")
    small = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    decoder = dict(small, num_key_value_heads=1, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return {
        "bert": (
            lambda attn: transformers.BertForSequenceClassification(
                transformers.BertConfig(**small, hidden_dropout_prob=0.2, attention_probs_dropout_prob=attn)
            ),
            r"module 'bert.encoder.layer.0.attention.self' passes dropout.p=0.3.*"
            r"config.attention_probs_dropout_prob=0",
        ),
        "roberta": (
            lambda attn: transformers.RobertaForSequenceClassification(
                transformers.RobertaConfig(
                    **small, hidden_dropout_prob=0.2, attention_probs_dropout_prob=attn
                )
            ),
            r"module 'roberta.encoder.layer.0.attention.self'.*config.attention_probs_dropout_prob=0",
        ),
        "llama": (
            lambda attn: transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**decoder, attention_dropout=attn)
            ),
            r"module 'model.layers.0.self_attn' .*attention_dropout=0.3.*config.attention_dropout=0",
        ),
        "phi3": (
            lambda attn: transformers.Phi3ForCausalLM(
                transformers.Phi3Config(**decoder, resid_pdrop=0.2, attention_dropout=attn)
            ),
            r"module 'model.layers.0.self_attn' .*config.attention_dropout=0",
        ),
    }


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "phi3"])
def test_hugging_face_dropout_is_shared_or_refused(family):
    build, refusal = _hf_models()[family]
    ids = torch.randint(3, 100, (2, 7))
    torch.manual_seed(0)
    shareable = build(0.0)
    pace.inject(shareable, rank=2, sigma=0.0, head=None)
    _perturb_adapters(shareable)
    assert _copies_differ_by(shareable, ids) == 0.0
    if family != "llama":  # Llama has no dropout but attention's: nothing else to keep live
        with torch.no_grad():
            assert not torch.equal(shareable(ids).logits, shareable(ids).logits)
    with pytest.raises(ValueError, match=refusal):
        pace.inject(build(0.3), rank=2, head=None)
