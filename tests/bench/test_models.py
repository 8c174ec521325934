"""The PEFT contenders and the language-model step of the benchmarks compute what the reference does."""

from __future__ import annotations

import pytest
import torch

from bench import models, specs
from bench.contenders import build_peft, build_reference, make_case

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("op", specs.OPS, ids=lambda op: op.name)
def test_peft_layer_contender_matches_the_reference_with_gradients(op):
    if op.kind == "lora_mul" and not hasattr(peft, "HiraConfig"):
        pytest.skip("this peft has no HiRA")
    case = make_case(op, specs.Shape("small", 2, 7, 24, 40), torch.float64, "cpu")
    got_fn, got_inputs = build_peft(case)
    want_fn, want_inputs = build_reference(case)
    got, want = got_fn(), want_fn()
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, got_inputs, case.grad_out)
    want_grads = torch.autograd.grad(want, want_inputs, case.grad_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_glora_vit_takes_the_reference_pace_step():
    if not hasattr(peft, "GloraConfig"):
        pytest.skip("this peft has no GLoRA")
    import pace

    cfg = models.vit_config("cpu")
    reference = models.build_vit(cfg, "cpu")
    glora = models.build_glora_vit(cfg, "cpu", reference)
    x, y = torch.randn(4, 3, cfg.img_size, cfg.img_size), torch.randint(0, cfg.num_classes, (4,))
    pace.set_sigma(reference, 1.0)
    models.set_glora_sigma(glora, 1.0)
    crit = pace.PaceCriterion(mode="pace")
    outs, grads = [], []
    for model in (reference, glora):
        torch.manual_seed(7)
        out = crit(model, x, y)
        outs.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, pace.trainable_parameters(model)))
    torch.testing.assert_close(outs[1], outs[0])
    assert sorted(g.numel() for g in grads[1]) == sorted(g.numel() for g in grads[0])
    norm = [torch.cat([g.reshape(-1) for g in gs]).norm() for gs in grads]
    torch.testing.assert_close(norm[1], norm[0], rtol=1e-4, atol=0.0)
    # the noise hooks matter: without them the copies agree and the step differs
    models.set_glora_sigma(glora, 0.0)
    pace.set_sigma(glora, 1.0)
    torch.manual_seed(7)
    assert not torch.allclose(crit(glora, x, y).loss, outs[0])


def test_lm_pace_loss_is_the_cross_entropy_when_the_copies_agree():
    pytest.importorskip("transformers")
    import pace

    cfg = models.llama_config("cpu")
    model = models.build_llama(cfg, "cpu")
    ids = torch.randint(0, cfg.vocab, (2, 12))
    pace.set_sigma(model, 0.0)
    plain = models.lm_step_loss(model, ids, pace_copies=False)
    torch.testing.assert_close(models.lm_step_loss(model, ids, pace_copies=True), plain)
    pace.set_sigma(model, 1.0)
    with torch.no_grad():  # lora_b = 0 at init would make the noise vanish
        for layer in model.modules():
            if isinstance(layer, pace.PaceLinear):
                layer.lora_b.normal_(0.0, 0.5)
    torch.manual_seed(3)
    got = models.lm_step_loss(model, ids, pace_copies=True, lam=0.5)
    torch.manual_seed(3)
    f1, f2 = model(input_ids=torch.cat([ids, ids])).logits.chunk(2)
    ce = torch.nn.functional.cross_entropy(f1[:, :-1].reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
    consistency = sum(
        (f1[b, t] - f2[b, t]).square().sum() for b in range(ids.shape[0]) for t in range(ids.shape[1] - 1)
    ) / (ids.shape[0] * (ids.shape[1] - 1))
    assert consistency > 0
    torch.testing.assert_close(got, ce + 0.5 * consistency)
