"""Gradient checkpointing must not change the gradients (issue 10, item 1).

Checkpointing replays the forward of its blocks during the backward, after PaceCriterion has
returned. The replay must draw the DropPath/dropout masks and the adapters' noise of the first
pass, so the gradients equal those of the same step without checkpointing.
"""

from typing import List

import pytest
import timm
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint
from timm.layers import DropPath

import pace

MODES = pace.MODES
REL_TOL = 1e-5


class _Block(nn.Module):
    """A residual MLP block with dropout and stochastic depth, as a user might write one."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop_path = DropPath(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.drop(torch.nn.functional.gelu(self.fc1(x)))))


class _UserModel(nn.Module):
    """Stem, blocks under ``torch.utils.checkpoint`` (when ``use_reentrant`` is set), head."""

    def __init__(self, dim: int = 12, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)
        self.use_reentrant = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for blk in self.blocks:
            if self.use_reentrant is None:
                h = blk(h)
            else:
                h = torch_checkpoint.checkpoint(blk, h, use_reentrant=self.use_reentrant)
        return self.head(h.mean(1))


def _tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=32,
        embed_dim=32,
        num_heads=2,
        depth=3,
        drop_path_rate=0.3,
        proj_drop_rate=0.2,
        attn_drop_rate=0.2,
        drop_rate=0.2,
    )


def _build(kind: str, backend: str) -> nn.Module:
    torch.manual_seed(1)
    model = _tiny_vit() if kind == "timm" else _UserModel()
    pace.inject(model, adapter="lora_mul_vpt_add", rank=3, sigma=0.8, backend=backend).train()
    with torch.no_grad():  # adapters away from their zero init, so every gradient path is live
        for p in pace.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    return model


def _set_checkpointing(model: nn.Module, flavour: str, on: bool) -> None:
    if flavour == "timm":
        model.set_grad_checkpointing(on)
    else:
        model.use_reentrant = (flavour == "reentrant") if on else None


def _step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, step: int) -> List[torch.Tensor]:
    for p in pace.trainable_parameters(model):
        p.grad = None
    crit = pace.PaceCriterion(mode, lam=1.0, num_samples=8, num_classes=3)
    torch.manual_seed(123)
    out = crit(model, x, y, index=torch.arange(x.shape[0]), step=step)
    out.loss.backward()
    return [p.grad.clone() for p in pace.trainable_parameters(model)]


def _rel_err(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    num = sum((g - w).double().square().sum() for g, w in zip(got, want)).sqrt()
    return (num / sum(w.double().square().sum() for w in want).sqrt()).item()


def _inputs(flavour: str):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 32, 32, generator=g) if flavour == "timm" else torch.randn(4, 6, 5, generator=g)
    return x, torch.tensor([0, 1, 2, 0])


def _check(flavour: str, mode: str, backend: str, step: int = 0, device: str = "cpu") -> None:
    model = _build("timm" if flavour == "timm" else "user", backend).to(device)
    x, y = (t.to(device) for t in _inputs(flavour))
    _set_checkpointing(model, flavour, False)
    want = _step(model, mode, x, y, step)
    _set_checkpointing(model, flavour, True)
    got = _step(model, mode, x, y, step)
    assert sum(w.abs().sum() for w in want) > 0
    assert _rel_err(got, want) < REL_TOL
    for m in model.modules():  # the pass's copy count does not outlive its backward
        if hasattr(m, "pace_copies"):
            assert m.pace_copies == 1


# FPA's pre-trained pass runs under no_grad, where reentrant checkpointing warns that nothing needs grad.
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("flavour", ["timm", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("mode", MODES)
def test_checkpointing_keeps_gradients_exact(flavour: str, mode: str, device: str) -> None:
    _check(flavour, mode, "torch", device=device)


@pytest.mark.parametrize(
    "flavour, mode", [("non_reentrant", mode) for mode in MODES] + [("reentrant", "pace")]
)
def test_checkpointing_keeps_gradients_exact_with_the_fused_kernels(
    flavour: str, mode: str, device: str
) -> None:
    _check(flavour, mode, "triton", device=device)


def test_lazy_full_batch_step_after_a_two_copy_step_under_checkpointing() -> None:
    """Lazy mode alternates 2 copies of half the batch and 1 copy of all of it."""
    _check("non_reentrant", "lazy", "torch", step=1)


def test_three_copies_under_checkpointing() -> None:
    model = _build("user", "torch")
    x, y = _inputs("user")

    def grads() -> List[torch.Tensor]:
        for p in pace.trainable_parameters(model):
            p.grad = None
        torch.manual_seed(5)
        pace.PaceCriterion("pace", copies=3)(model, x, y).loss.backward()
        return [p.grad.clone() for p in pace.trainable_parameters(model)]

    want = grads()
    model.use_reentrant = False
    assert _rel_err(grads(), want) < REL_TOL


def test_a_failed_backward_leaves_no_copy_count_behind() -> None:
    model = _build("user", "torch")
    model.use_reentrant = False
    x, y = _inputs("user")

    def fail(grad: torch.Tensor) -> None:
        raise RuntimeError("boom")

    # The stem's gradient comes last, after the backward has put the pass's count in force.
    def on_stem(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(fail)

    hook = model.stem.register_forward_hook(on_stem)
    out = pace.PaceCriterion("pace")(model, x, y)
    hook.remove()
    with pytest.raises(RuntimeError, match="boom"):
        out.loss.backward()
    # A plain forward of an odd batch afterwards draws one mask per sample again.
    with torch.no_grad():
        model(torch.randn(3, 6, 5))
    assert model.blocks[0].drop.pace_copies == 1
    pace.PaceCriterion("pace")(model, x, y).loss.backward()


def test_one_backward_through_passes_of_different_copy_counts_is_refused() -> None:
    model = _build("user", "torch")
    x, y = _inputs("user")
    two = pace.PaceCriterion("lazy")(model, x, y, step=0)
    one = pace.PaceCriterion("lazy")(model, x, y, step=1)
    with pytest.raises(RuntimeError, match="2 and 1 copies|1 and 2 copies"):
        (two.loss + one.loss).backward()
    # Each backward on its own is fine.
    pace.PaceCriterion("lazy")(model, x, y, step=0).loss.backward()


def test_multi_copy_pass_by_hand_restores_the_count() -> None:
    model = _build("user", "torch")
    model.use_reentrant = True
    x, _ = _inputs("user")
    with pace.MultiCopyPass(model, 2) as layout:
        assert model.blocks[0].drop.pace_copies == 2
        out = layout.bind(model(torch.cat([x, x])))
    assert model.blocks[0].drop.pace_copies == 1
    out.square().sum().backward()
    assert model.blocks[0].drop.pace_copies == 1
    with pytest.raises(ValueError, match="copies must be an int >= 1"):
        pace.MultiCopyPass(model, 0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hugging_face_gradient_checkpointing_keeps_gradients_exact(use_reentrant: bool) -> None:
    transformers = pytest.importorskip("transformers")

    def grads(checkpointing: bool) -> List[torch.Tensor]:
        torch.manual_seed(0)
        config = transformers.Phi3Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=100,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            resid_pdrop=0.2,
        )
        model = transformers.Phi3ForCausalLM(config)
        pace.inject(model, adapter="lora_mul_vpt_add", rank=3, sigma=0.8, head=None).train()
        with torch.no_grad():
            for p in pace.trainable_parameters(model):
                p.add_(0.05 * torch.randn_like(p))
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
        torch.manual_seed(9)
        with pace.MultiCopyPass(model, 2) as layout:
            logits = layout.bind(model(torch.cat([ids, ids]), use_cache=False).logits)
        first, second = logits.chunk(2)
        loss = torch.nn.functional.cross_entropy(first.flatten(0, 1), ids.flatten())
        (loss + pace.consistency(first, second)).backward()
        return [p.grad.clone() for p in pace.trainable_parameters(model)]

    assert _rel_err(grads(True), grads(False)) < REL_TOL
