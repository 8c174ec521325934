"""The PACE objectives (docs/design.md section 5) pinned on hand-computed cases."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import pace


class _CopyOffsetModel(nn.Module):
    """Logits = input + (copy index) * offset: copy c of the batch is shifted by c * offset, so the
    consistency between copies is known by hand. Records the batch sizes it saw."""

    def __init__(self, offset):
        super().__init__()
        self.offset = torch.as_tensor(offset)
        self.pace_copies = 1  # set by pace.set_copies, as for the shared DropPath layers
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        copies = self.pace_copies
        per = x.shape[0] // copies
        shift = torch.arange(copies).repeat_interleave(per)[:, None] * self.offset
        return x + shift


X = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
Y = torch.tensor([0, 1])


def test_pace_two_copies_by_hand():
    model = _CopyOffsetModel([1.0, -2.0, 0.0])
    out = pace.PaceCriterion("pace", lam=0.5)(model, X, Y)
    assert model.seen == [4]
    cls = F.cross_entropy(X, Y)
    cons = torch.tensor(1.0 + 4.0)  # every sample: sum_c offset^2 = 5
    torch.testing.assert_close(out.cls_loss, cls)
    torch.testing.assert_close(out.consistency, cons)
    torch.testing.assert_close(out.loss, cls + 0.5 * cons)
    torch.testing.assert_close(out.logits, X)


def test_pace_three_copies_average_over_pairs():
    model = _CopyOffsetModel([1.0, 0.0, 0.0])
    out = pace.PaceCriterion("pace", lam=1.0, copies=3)(model, X, Y)
    # pairs (0,1), (1,2): distance 1; (0,2): distance 4 -> mean 2
    torch.testing.assert_close(out.consistency, torch.tensor(2.0))
    assert model.pace_copies == 1  # reset after the multi-copy pass


def test_fast_reads_bank_before_writing_and_only_at_index():
    crit = pace.PaceCriterion("fast", lam=2.0, num_samples=5, num_classes=3)
    crit.history_bank[3] = torch.tensor([1.0, 1.0, 1.0])
    crit.history_bank[0] = torch.tensor([7.0, 7.0, 7.0])
    model = _CopyOffsetModel([0.0, 0.0, 0.0])
    out = crit(model, X, Y, index=torch.tensor([3, 1]))
    expected = ((X[0] - 1).square().sum() + X[1].square().sum()) / 2
    torch.testing.assert_close(out.consistency, expected)
    torch.testing.assert_close(out.loss, F.cross_entropy(X, Y) + 2.0 * expected)
    torch.testing.assert_close(crit.history_bank[3], X[0])
    torch.testing.assert_close(crit.history_bank[1], X[1])
    torch.testing.assert_close(crit.history_bank[0], torch.tensor([7.0, 7.0, 7.0]))
    assert crit.history_bank[[2, 4]].abs().sum() == 0
    out2 = crit(model, X, Y, index=torch.tensor([3, 1]))
    assert out2.consistency.item() == 0.0  # compared with what the first call wrote
    assert "history_bank" in crit.state_dict()


def test_lazy_alternates_half_batch_pace_and_full_batch_ce():
    model = _CopyOffsetModel([1.0, 0.0, 0.0])
    crit = pace.PaceCriterion("lazy", lam=1.0, lazy_interval=2)
    out0 = crit(model, X, Y, step=0)
    assert model.seen == [2]  # first half (1 sample) as two copies
    torch.testing.assert_close(out0.consistency, torch.tensor(1.0))
    torch.testing.assert_close(out0.cls_loss, F.cross_entropy(X[:1], Y[:1]))
    assert out0.targets.tolist() == [0]
    out1 = crit(model, X, Y, step=1)
    assert model.seen == [2, 2]
    assert out1.consistency.item() == 0.0
    torch.testing.assert_close(out1.loss, F.cross_entropy(X, Y))


def test_fpa_compares_with_adapters_off_and_none_is_plain_ce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    pace.inject(model, adapter="lora_add", rank=2, sigma=0.0, head=None)
    with torch.no_grad():
        model[0].lora_b.fill_(0.3)
    out = pace.PaceCriterion("fpa", lam=3.0)(model, X, Y)
    with pace.adapters_disabled(model):
        f0 = model(X)
    f = model(X)
    torch.testing.assert_close(out.consistency, (f - f0).square().sum(-1).mean())
    torch.testing.assert_close(out.loss, F.cross_entropy(f, Y) + 3.0 * out.consistency)
    plain = pace.PaceCriterion("none")(model, X, Y)
    torch.testing.assert_close(plain.loss, F.cross_entropy(f, Y))


def _small_vit(drop_path):
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=4,
        img_size=32,
        depth=3,
        drop_path_rate=drop_path,
    )


def test_shared_drop_path_copies_identical_without_noise_and_different_with_noise():
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 1, 2])
    model = pace.inject(_small_vit(0.1), adapter="lora_mul_vpt_add", rank=4, sigma=0.0).train()
    with torch.no_grad():
        for p in pace.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    crit = pace.PaceCriterion("pace", lam=1.0)
    out = crit(model, x, y)
    assert out.consistency.item() == 0.0
    # The DropPath masks really do something: two single-copy passes differ.
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
    pace.set_sigma(model, 0.5)
    assert crit(model, x, y).consistency.item() > 0


def test_bad_criterion_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        pace.PaceCriterion("slow")
    with pytest.raises(ValueError, match="lam must be"):
        pace.PaceCriterion("pace", lam=-1)
    with pytest.raises(ValueError, match="needs num_samples"):
        pace.PaceCriterion("fast", num_classes=3)
    with pytest.raises(ValueError, match="copies must be an int >= 2"):
        pace.PaceCriterion("pace", copies=1)
    crit = pace.PaceCriterion("fast", num_samples=4, num_classes=3)
    with pytest.raises(ValueError, match="needs index"):
        crit(_CopyOffsetModel([0.0] * 3), X, Y)
    with pytest.raises(ValueError, match=r"index must have shape \[2\]"):
        crit(_CopyOffsetModel([0.0] * 3), X, Y, index=torch.tensor([0, 1, 2]))


def test_fpa_pretrained_pass_reuses_the_drop_path_masks():
    """At initialisation the adapters add nothing, so with the masks shared FPA's distance is 0;
    a fresh mask for the pre-trained pass would make it positive."""
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    model = pace.inject(_small_vit(0.5), adapter="lora_mul_vpt_add", rank=4, sigma=0.0).train()
    out = pace.PaceCriterion("fpa", lam=1.0)(model, x, y)
    assert out.consistency.item() == 0.0
    assert pace.fp_distance(model, x).item() == 0.0
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # the masks are live


def test_drop_path_mask_is_mean_normalised_and_tiled_over_copies():
    layer = pace.SharedDropPath(0.5).train()
    pace.set_copies(layer, 2)
    x = torch.ones(2 * 64, 3)
    out = layer(x)[:, 0]
    assert torch.equal(out[:64], out[64:])  # copy c of sample b at row c*B + b shares its mask
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))  # public PACE code: mask / mask.mean()
    assert set(out.unique().tolist()) <= {0.0, out.max().item()}
    timm_style = pace.SharedDropPath(0.5, mean_normalize=False).train()
    assert set(timm_style(torch.ones(64, 3)).unique().tolist()) <= {0.0, 2.0}
