"""The paper's held-out diagnostics (pace.diagnostics): pinned in closed form on a linear head,
independent of how the held-out set is batched, and free of side effects."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import pace


def _closed_form_grad_norm(weight, bias, x, y):
    """Mean CE of a linear classifier ``x W^T + b``: ``dW = (P - Y)^T X / N``, ``db = colsum(P - Y) / N``."""
    w, b, x = weight.double(), bias.double(), x.double()
    p = torch.softmax(x @ w.T + b, dim=-1)
    residual = p - nn.functional.one_hot(y, w.shape[0]).double()
    d_w = residual.T @ x / x.shape[0]
    d_b = residual.sum(0) / x.shape[0]
    return math.sqrt(d_w.square().sum().item() + d_b.square().sum().item())


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


class _AdaptedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.drop(self.act(self.fc1(x))))


def _adapted_mlp(adapter="lora_mul_vpt_add", sigma=1.0):
    torch.manual_seed(0)
    model = pace.inject(_AdaptedMLP(), adapter=adapter, rank=3, sigma=sigma, head="head")
    with torch.no_grad():  # move the adapters off their identity initialisation
        for p in pace.trainable_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
    return model.train()


def _data(n=23, k=6, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_grad_norm_of_a_linear_classifier_matches_the_closed_form():
    x, y = _data()
    head = nn.Linear(6, 4)
    got = pace.heldout_grad_norm(head, _batches(x, y, 5))
    assert got == pytest.approx(_closed_form_grad_norm(head.weight, head.bias, x, y), rel=1e-5)


def test_noisy_pace_head_is_measured_without_noise():
    # A trainable PACE head with sigma 2 in train mode: the measurement must see the noise-free
    # head, so it equals the closed form of the plain linear map.
    x, y = _data()
    head = pace.PaceLinear.from_linear(nn.Linear(6, 4), adapter="head", sigma=2.0).train()
    want = _closed_form_grad_norm(head.weight, head.bias, x, y)
    for _ in range(3):
        assert pace.heldout_grad_norm(head, _batches(x, y, 4)) == pytest.approx(want, rel=1e-5)
    assert head.training


def test_token_level_labels_skip_ignored_positions():
    x, y = _data(n=12)
    head = nn.Linear(6, 4)
    labels = y.clone()
    labels[::3] = -100  # unscored positions count in neither the loss nor the sample count
    scored = labels != -100
    want = _closed_form_grad_norm(head.weight, head.bias, x[scored], y[scored])
    batches = [(x.view(3, 4, 6), labels.view(3, 4))]
    got = pace.heldout_diagnostics(head, batches, fp_distance=False)
    assert got.grad_norm == pytest.approx(want, rel=1e-5)
    assert got.samples == int(scored.sum())


@pytest.mark.parametrize("adapter", ["lora_add", "lora_mul_vpt_add"])
def test_value_does_not_depend_on_the_batch_size(adapter):
    model = _adapted_mlp(adapter)
    x, y = _data()
    results = [pace.heldout_diagnostics(model, _batches(x, y, size)) for size in (1, 4, 7, 23)]
    for r in results[1:]:
        assert r.grad_norm == pytest.approx(results[0].grad_norm, rel=1e-5)
        assert r.fp_distance == pytest.approx(results[0].fp_distance, rel=1e-5)
        assert r.loss == pytest.approx(results[0].loss, rel=1e-6)
        assert r.accuracy == results[0].accuracy and r.samples == 23
    # ... and it is the gradient of the mean loss, not the mean of per-batch gradient norms
    per_batch = [pace.heldout_grad_norm(model, [b]) for b in _batches(x, y, 4)]
    assert abs(sum(per_batch) / len(per_batch) - results[0].grad_norm) > 1e-3 * results[0].grad_norm


def test_grad_norm_equals_autograd_on_the_whole_set_in_eval_mode():
    model = _adapted_mlp()
    x, y = _data()
    got = pace.heldout_diagnostics(model, _batches(x, y, 6))
    reference = _adapted_mlp().eval()  # the same weights, built the same way
    params = pace.trainable_parameters(reference)
    logits = reference(x)
    grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y), params)
    want = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert got.grad_norm == pytest.approx(want, rel=1e-5)
    assert got.loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert got.accuracy == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert got.fp_distance == pytest.approx(pace.fp_distance(reference, x).item(), rel=1e-5)
    assert pace.heldout_fp_distance(model, _batches(x, y, 5)) == pytest.approx(got.fp_distance, rel=1e-5)
    assert got.fp_distance > 0


def test_fp_distance_is_zero_for_the_pretrained_model():
    torch.manual_seed(0)
    model = pace.inject(_AdaptedMLP(), adapter="lora_mul_vpt_add", rank=3, sigma=1.0, head="head")
    x, y = _data()
    assert pace.heldout_fp_distance(model.train(), _batches(x, y, 8)) == 0.0


def test_no_side_effects_on_grad_mode_or_random_streams():
    model = _adapted_mlp()
    model.head.eval()  # a mixed train/eval model keeps each module's own flag
    flags = {n: m.training for n, m in model.named_modules()}
    params = pace.trainable_parameters(model)
    params[0].grad = torch.full_like(params[0], 7.0)
    x, y = _data()
    # A shuffling loader draws its order from the global stream: that, too, is put back.
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    state = torch.get_rng_state()
    pace.heldout_diagnostics(model, loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0))
    assert all(p.grad is None for p in params[1:])
    with torch.no_grad():  # also measurable from inside a no_grad evaluation
        assert pace.heldout_grad_norm(model, _batches(x, y, 5)) > 0


def test_ddp_wrapper_is_measured_through_its_module():
    model = _adapted_mlp()
    x, y = _data()

    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to unwrap
            nn.Module.__init__(self)
            self.module = module

    want = pace.heldout_grad_norm(model, _batches(x, y, 5))
    assert pace.heldout_grad_norm(FakeDDP(model), _batches(x, y, 5)) == pytest.approx(want)


def test_bad_input_is_named():
    model = _adapted_mlp()
    x, y = _data()
    with pytest.raises(TypeError, match="batches must yield"):
        pace.heldout_grad_norm(model, [x])
    with pytest.raises(ValueError, match="labels of shape"):
        pace.heldout_grad_norm(model, [(x, y[:-1])])
    with pytest.raises(ValueError, match="no labelled sample"):
        pace.heldout_grad_norm(model, [])
    with pytest.raises(ValueError, match="no trainable tensors"):
        pace.heldout_grad_norm(nn.Linear(6, 4).requires_grad_(False), [(x, y)])
    with pytest.raises(ValueError, match="params must be"):
        pace.heldout_grad_norm(model, [(x, y)], params=[torch.zeros(3)])


def test_all_reduce_combines_shares_over_the_process_group(tmp_path):
    import torch.distributed as torch_dist

    model = _adapted_mlp()
    x, y = _data()
    want = pace.heldout_diagnostics(model, _batches(x, y, 5))
    with pytest.raises(ValueError, match="process group"):
        pace.heldout_diagnostics(model, _batches(x, y, 5), all_reduce=True)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = pace.heldout_diagnostics(model, _batches(x, y, 5), all_reduce=True)
    finally:
        torch_dist.destroy_process_group()
    assert got.samples == want.samples and got.accuracy == want.accuracy
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-6)
    assert got.fp_distance == pytest.approx(want.fp_distance, rel=1e-6)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
