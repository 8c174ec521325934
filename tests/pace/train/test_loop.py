"""The training loop: exact resume, a NaN loss stops the run and keeps the last checkpoint, export."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

import pace
from pace.train.checkpoint import load_training_checkpoint
from pace.train.metrics import read_metrics, without_timing

from .conftest import SMALL_DEFAULT


def _run_dir(out, name="PACE_fast"):
    return out / name / "seed0"


def test_resume_gives_the_uninterrupted_result(run_main, tmp_path):
    args = ["--pace", "fast", *SMALL_DEFAULT, "--epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(*args, "--out", straight).code == 0
    shutil.copytree(straight / "pretrain", split / "pretrain")  # same backbone, no second pre-training

    res = run_main(*args, "--out", split, "--stop-after-epoch", "1")
    assert res.code == 0, res.err
    assert load_training_checkpoint(_run_dir(split) / "checkpoint.pt")["epoch"] == 1
    assert not (_run_dir(split) / "adapter.safetensors").exists()  # not finished yet
    res = run_main(*args, "--out", split, "--resume")
    assert res.code == 0, res.err
    assert "resumed from" in res.err

    a = load_file(_run_dir(straight) / "adapter.safetensors")
    b = load_file(_run_dir(split) / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = without_timing(read_metrics(_run_dir(straight) / "metrics.jsonl"))
    mb = without_timing(read_metrics(_run_dir(split) / "metrics.jsonl"))
    assert ma == mb
    assert sum(r["type"] == "step" for r in ma) == 2 * 3  # 15 images in batches of 5, 2 epochs
    ca = load_training_checkpoint(_run_dir(straight) / "checkpoint.pt")
    cb = load_training_checkpoint(_run_dir(split) / "checkpoint.pt")
    assert torch.equal(ca["criterion"]["history_bank"], cb["criterion"]["history_bank"])
    assert ca["step"] == cb["step"] == 6


def test_resume_refuses_a_different_run(run_main, tmp_path):
    args = ["--pace", "none", *SMALL_DEFAULT, "--epochs", "2", "--out", tmp_path]
    assert run_main(*args, "--stop-after-epoch", "1").code == 0
    res = run_main(*args, "--resume", "--adapter", "lora_add")
    assert res.code == 2 and "adapter='lora_mul_vpt_add'" in res.err and "Traceback" not in res.err


def poison_loss_at_step(monkeypatch, bad_step, mode="pace"):
    """Make the loss of the criterion of one objective NaN at one global step (0-based)."""
    forward = pace.PaceCriterion.forward

    def poisoned(self, model, x, y, index=None, step=0):
        out = forward(self, model, x, y, index=index, step=step)
        if step == bad_step and self.mode == mode:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(pace.PaceCriterion, "forward", poisoned)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(run_main, tmp_path, monkeypatch):
    args = ["--pace", "pace", *SMALL_DEFAULT, "--epochs", "3", "--out", tmp_path]
    ckpt = _run_dir(tmp_path, "PACE") / "checkpoint.pt"
    with monkeypatch.context() as patch:
        poison_loss_at_step(patch, 4)  # 3 steps per epoch: the second step of epoch 2
        res = run_main(*args)
    assert res.code == 1
    assert "non-finite loss (nan) at epoch 2, step 5" in res.err
    assert "checkpoint" in res.err and "Traceback" not in res.err
    kept = load_training_checkpoint(ckpt)
    assert kept["epoch"] == 1 and kept["step"] == 3
    assert all(torch.isfinite(t).all() for t in kept["adapter"].values())
    # ... and the run can go on from it.
    res = run_main(*args, "--resume")
    assert res.code == 0, res.err
    assert load_training_checkpoint(ckpt)["epoch"] == 3


def test_export_writes_the_merged_model(run_main, tmp_path):
    import pace
    from pace.train.config import build_config
    from pace.train.default import make_model

    export = tmp_path / "merged.safetensors"
    res = run_main(
        "--pace", "pace", *SMALL_DEFAULT, "--epochs", "1", "--out", tmp_path / "o", "--export", export
    )
    assert res.code == 0, res.err
    merged_state = load_file(export)
    assert not any("lora" in k or "prompt" in k for k in merged_state)

    merged = make_model(build_config({}), 0.0)
    merged.load_state_dict(merged_state)
    adapted = make_model(build_config({}), 0.0)
    backbone = load_file(tmp_path / "o" / "pretrain" / "backbone.safetensors")
    adapted.load_state_dict({k: v for k, v in backbone.items() if not k.startswith("head.")}, strict=False)
    pace.load_adapter(adapted, _run_dir(tmp_path / "o", "PACE") / "adapter")
    x = torch.randn(8, 1, 16, 16)
    merged.eval(), adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-4, atol=1e-5)
