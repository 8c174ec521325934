"""PACE on Hugging Face models: keyword batches, per-token labels, head detection, RMSNorm SSF, Trainer.

Tiny RoBERTa- and Llama-style models are built from config objects (no download)."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pace
from pace.losses import repeat_inputs

transformers = pytest.importorskip("transformers")

VOCAB, B, T = 48, 3, 7


def _llama_config(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def _llama_lm():
    return transformers.LlamaForCausalLM(_llama_config()).eval()


def _roberta_classifier(num_labels=3):
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=T + 4,
        num_labels=num_labels,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.RobertaForSequenceClassification(cfg)


def _padded_batch():
    """Right-padded token ids with their attention mask: sample b has ``T - b`` real tokens."""
    ids = torch.randint(3, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, T - b :] = 0
        ids[b, T - b :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class _ToyTokenModel(nn.Module):
    """Per-token logits ``E[input_ids]``, plus a known offset on the rows of the second copy, so the
    PACE losses can be computed by hand. Checks that ``attention_mask`` came repeated with the ids."""

    def __init__(self, classes=5):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, classes)
        self.offset = torch.randn(T, classes)
        self.batch = None

    def forward(self, input_ids, attention_mask):
        assert attention_mask.shape == input_ids.shape
        logits = self.embed(input_ids)
        if input_ids.shape[0] == 2 * self.batch:
            logits = torch.cat([logits[: self.batch], logits[self.batch :] + self.offset])
        return {"logits": logits}


def _token_labels(ids, mask):
    """Labels = ids, with padding and the first (prompt) token of every sample ignored."""
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, 0] = -100
    return labels


@pytest.mark.parametrize("shift", [False, True])
def test_token_level_pace_counts_labelled_positions_only(shift):
    model = _ToyTokenModel()
    batch = _padded_batch()
    model.batch = B
    labels = _token_labels(batch["input_ids"], batch["attention_mask"]) % 5
    labels[labels < 0] = -100
    labels[labels == 4] = -100  # some real tokens unlabelled too
    out = pace.PaceCriterion("pace", lam=0.3, shift_labels=shift)(model, batch, labels)

    logits = model.embed(batch["input_ids"]).detach()
    ce_terms, cons_terms = [], []
    for b in range(B):
        for t in range(T - 1 if shift else T):
            target = labels[b, t + 1] if shift else labels[b, t]
            if target == -100:
                continue
            ce_terms.append(-torch.log_softmax(logits[b, t], -1)[target])
            cons_terms.append(model.offset[t].square().sum())
    ce, cons = torch.stack(ce_terms).mean(), torch.stack(cons_terms).mean()
    torch.testing.assert_close(out.cls_loss.detach(), ce)
    torch.testing.assert_close(out.consistency.detach(), cons)
    torch.testing.assert_close(out.loss.detach(), ce + 0.3 * cons)
    # the padding-free mean over all positions differs: the mask matters in this case
    assert not math.isclose(cons.item(), model.offset.square().sum(-1).mean().item(), rel_tol=1e-3)


def test_causal_lm_pace_matches_its_definition_and_ignores_padding():
    model = _llama_lm()
    pace.inject(model, adapter="lora_add", rank=2, sigma=0.5, targets=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # B = 0 at init would make the noise invisible
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
    model.train()
    batch = _padded_batch()
    labels = _token_labels(batch["input_ids"], batch["attention_mask"])
    crit = pace.PaceCriterion("pace", lam=1.0, shift_labels=True)
    torch.manual_seed(1)
    out = crit(model, batch, labels)
    torch.manual_seed(1)
    both = model(**repeat_inputs(batch, 2)).logits
    f1, f2 = both[:B, :-1], both[B:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    ce = F.cross_entropy(f1[keep], target[keep])
    cons = (f1 - f2)[keep].square().sum(-1).mean()
    torch.testing.assert_close(out.cls_loss, ce)
    torch.testing.assert_close(out.consistency, cons)
    assert out.consistency > 0
    out.loss.backward()
    assert all(p.grad is not None for p in pace.trainable_parameters(model))

    # the ids under the padding are never scored and (causal) never seen by scored positions
    changed = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    torch.manual_seed(1)
    again = crit(model, changed, labels)
    torch.testing.assert_close(again.loss, out.loss)


@pytest.mark.parametrize("mode", pace.MODES)
def test_every_mode_takes_keyword_batches(mode):
    model = _roberta_classifier()
    pace.inject(model, adapter="lora_mul", rank=2, sigma=0.5, targets=["query", "value"])
    model.train()
    batch = _padded_batch()
    labels = torch.tensor([0, 2, 1])
    kw = dict(num_samples=10, num_classes=3) if mode == "fast" else {}
    crit = pace.PaceCriterion(mode, lam=0.5, **kw)
    out = crit(model, batch, labels, index=torch.tensor([4, 0, 9]), step=0)
    assert torch.isfinite(out.loss) and out.logits.shape == (B if mode != "lazy" else 1, 3)
    out.loss.backward()
    head = model.classifier.out_proj
    assert head.weight.grad is not None and model.classifier.dense.weight.grad is not None
    if mode == "fast":
        assert crit.history_bank[[4, 0, 9]].abs().sum() > 0 and crit.history_bank[1].abs().sum() == 0


def test_per_sample_labels_ignore_index_leaves_the_consistency():
    model = _ToyTokenModel(classes=4)
    model.batch = B

    class _PerSample(nn.Module):
        def forward(self, input_ids, attention_mask):
            return (model(input_ids, attention_mask)["logits"][:, 0],)  # a tuple, logits first

    batch = _padded_batch()
    labels = torch.tensor([1, -100, 3])
    out = pace.PaceCriterion("pace", lam=1.0)(_PerSample(), batch, labels)
    logits = model.embed(batch["input_ids"][:, 0]).detach()
    torch.testing.assert_close(out.cls_loss.detach(), F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    torch.testing.assert_close(out.consistency.detach(), model.offset[0].square().sum())


def test_head_auto_on_hugging_face_models():
    roberta = pace.inject(_roberta_classifier(), adapter="lora_add", rank=2, targets=["query", "value"])
    heads = {n for n, m in roberta.named_modules() if isinstance(m, pace.PaceLinear) and m.adapter == "head"}
    assert heads == {"classifier.dense", "classifier.out_proj"}
    assert roberta.pace_config["head"] == ["classifier.dense", "classifier.out_proj"]
    idx = {n: m.block_index for n, m in roberta.named_modules() if isinstance(m, pace.PaceLinear)}
    assert idx["classifier.dense"] == idx["classifier.out_proj"] == 2
    assert idx["roberta.encoder.layer.1.attention.self.query"] == 1

    lm = pace.inject(_llama_lm(), adapter="lora_add", rank=2, targets=["q_proj"])
    assert type(lm.lm_head) is nn.Linear and not lm.lm_head.weight.requires_grad
    every = pace.inject(_llama_lm(), adapter="lora_add", rank=2)  # every linear layer but the output one
    assert type(every.lm_head) is nn.Linear and every.model.layers[1].mlp.down_proj.adapter == "lora_add"
    asked = pace.inject(_llama_lm(), adapter="lora_add", rank=2, targets=["q_proj"], head="lm_head")
    assert asked.lm_head.adapter == "head" and asked.lm_head.weight.requires_grad

    scorer = transformers.LlamaForSequenceClassification(_llama_config(num_labels=2))
    pace.inject(scorer, adapter="lora_add", rank=2, targets=["q_proj"])
    assert scorer.score.adapter == "head" and scorer.score.weight.requires_grad


def test_head_auto_refuses_a_task_model_without_a_known_head():
    class ToyForRegression(transformers.RobertaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.roberta = transformers.RobertaModel(config, add_pooling_layer=False)
            self.regressor = nn.Linear(config.hidden_size, 1)

    model = ToyForRegression(_roberta_classifier().config)
    with pytest.raises(ValueError, match="found no classifier on ToyForRegression"):
        pace.inject(model, adapter="lora_add", rank=2, targets=["query"])
    pace.inject(model, adapter="lora_add", rank=2, targets=["query"], head="regressor")
    assert model.regressor.weight.requires_grad


def test_rlrr_puts_ssf_after_rmsnorm_and_merges_exactly():
    model = _llama_lm()
    ids = torch.randint(0, VOCAB, (2, 5))
    pace.inject(model, adapter="rlrr", sigma=0.3, targets=["q_proj", "o_proj", "up_proj"])
    ssf = [n for n, m in model.named_modules() if isinstance(m, pace.SSFNorm)]
    assert len(ssf) == 2 * 2 + 1  # two per decoder layer and the final norm
    with torch.no_grad():  # make every SSF and adapter tensor non-trivial
        for p in pace.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    before = model(ids).logits
    pace.merge(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, pace.PaceLinear) for m in model.modules())
    # LlamaRMSNorm has no bias to hold SSF's shift: the SSF stays, frozen
    assert all(not p.requires_grad for p in model.parameters())
    assert len([m for m in model.modules() if isinstance(m, pace.SSFNorm)]) == 5

    roberta = _roberta_classifier().eval()
    pace.inject(roberta, adapter="rlrr", targets=["query"])
    with torch.no_grad():
        for p in pace.trainable_parameters(roberta):
            p.add_(0.05 * torch.randn_like(p))
    before = roberta(ids).logits
    pace.merge(roberta)  # LayerNorm's affine holds the SSF
    torch.testing.assert_close(roberta(ids).logits, before, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, pace.SSFNorm) for m in roberta.modules())


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.zeros(B + 1, dtype=torch.long), "batch size 3"),
        (torch.zeros(B, T + 2, dtype=torch.long), r"per-token labels must have shape \[B, T\]"),
        (torch.zeros(B, 2, 2, dtype=torch.long), "do not fit logits"),
    ],
)
def test_labels_of_the_wrong_shape(labels, match):
    model = _llama_lm()
    with pytest.raises(ValueError, match=match):
        pace.PaceCriterion("pace", shift_labels=True)(model, _padded_batch(), labels)


def test_bad_models_and_inputs_give_clear_errors():
    batch = _padded_batch()
    labels = _token_labels(batch["input_ids"], batch["attention_mask"])

    class NoLogits(nn.Module):
        def forward(self, input_ids, attention_mask):
            return {"hidden_states": input_ids.float()}

    with pytest.raises(TypeError, match="has no logits"):
        pace.PaceCriterion("none")(NoLogits(), batch, labels)
    with pytest.raises(TypeError, match="inputs must be a tensor or a mapping"):
        pace.PaceCriterion("none")(_llama_lm(), [batch["input_ids"]], labels)
    with pytest.raises(ValueError, match=r"bank \[num_samples, T, vocab\]"):
        pace.PaceCriterion("fast", num_samples=5, num_classes=VOCAB)(
            _llama_lm(), batch, labels, index=torch.arange(B)
        )


def test_import_pace_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import pace, pace.hf\n"
        "try:\n    pace.hf.PaceTrainer\nexcept ImportError:\n    print('needs transformers')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "needs transformers"


class _Examples(torch.utils.data.Dataset):
    def __init__(self, n, per_token):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, T), generator=g)
        self.per_token = per_token

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        labels = ids.clone() if self.per_token else int(ids[0] % 3)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(T, dtype=torch.long),
            "labels": labels,
            "pace_index": i,
        }


@pytest.mark.parametrize("mode", ["pace", "fast"])
def test_trainer_runs_pace(tmp_path, mode):
    from pace.hf import PaceTrainer

    if mode == "pace":
        model, data = _llama_lm(), _Examples(8, per_token=True)
        crit = pace.PaceCriterion("pace", lam=0.5, shift_labels=True)
        targets = ["q_proj", "v_proj"]
    else:
        model, data = _roberta_classifier(), _Examples(8, per_token=False)
        crit = pace.PaceCriterion("fast", lam=0.5, num_samples=len(data), num_classes=3)
        targets = ["query", "value"]
    pace.inject(model, adapter="lora_add", rank=2, sigma=0.5, targets=targets)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = PaceTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, pace_criterion=crit)
    trainer.train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_b" in n)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    if mode == "fast":  # the dataset indices reached the criterion: 12 samples seen, 8 rows written
        assert (crit.history_bank.abs().sum(-1) > 0).all()


def test_trainer_gradient_accumulation_averages_micro_batches(tmp_path):
    """One SGD step over 4 examples equals one over 2 micro-batches of 2 accumulated (no noise)."""
    from pace.hf import PaceTrainer

    data = _Examples(4, per_token=True)
    weights = []
    for batch, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = pace.inject(_llama_lm(), adapter="lora_add", rank=2, targets=["q_proj", "v_proj"])
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        crit = pace.PaceCriterion("pace", lam=1.0, shift_labels=True)
        PaceTrainer(model=model, args=args, train_dataset=data, pace_criterion=crit).train()
        weights.append(model.model.layers[0].self_attn.q_proj.lora_b.detach().clone())
    assert weights[0].abs().sum() > 0
    torch.testing.assert_close(weights[0], weights[1])


def _grad_rel_err(got, want):
    num = sum((g - w).double().square().sum() for g, w in zip(got, want)).sqrt()
    return (num / sum(w.double().square().sum() for w in want).sqrt()).item()


@pytest.mark.parametrize("backend, use_reentrant", [("torch", False), ("torch", True), ("triton", False)])
def test_padded_token_batch_under_hugging_face_checkpointing_keeps_pace_gradients_exact(
    backend, use_reentrant, device
):
    """The features combined: a dict batch with padding, per-token (shifted) labels, the two-copy
    PACE objective and Hugging Face gradient checkpointing, on the reference and the fused kernels
    (on the test device: real kernels on CUDA, Triton's interpreter on CPU)."""
    batch = {k: v.to(device) for k, v in _padded_batch().items()}
    labels = _token_labels(batch["input_ids"], batch["attention_mask"])

    def grads(checkpointing):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(_llama_config()).to(device)
        pace.inject(model, adapter="lora_mul_vpt_add", rank=2, sigma=0.8, head=None, backend=backend)
        with torch.no_grad():  # B = 0 at init would make the noise (and the consistency) vanish
            for p in pace.trainable_parameters(model):
                p.add_(0.1 * torch.randn_like(p))
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        model.train()
        torch.manual_seed(9)
        out = pace.PaceCriterion("pace", lam=1.0, shift_labels=True)(model, batch, labels)
        assert out.consistency > 0
        out.loss.backward()
        return [p.grad.clone() for p in pace.trainable_parameters(model)]

    want = grads(checkpointing=False)
    assert sum(w.abs().sum() for w in want) > 0
    assert _grad_rel_err(grads(checkpointing=True), want) < 1e-5
