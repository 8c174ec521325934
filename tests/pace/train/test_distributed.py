"""Data-parallel training under torchrun (gloo on CPU): the PACE_fast bank stays whole on every rank;
more ranks per node than GPUs is a usage error, not a crash in set_device."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pace.train.checkpoint import load_training_checkpoint

from .conftest import SMALL_DEFAULT, python, subprocess_env

# Runs pace-train in each rank, recording what the PACE_fast criterion saw, and saves per rank the
# indices it was given, its bank, the rank's noise seed and the world size.
RECORDING_DRIVER = """
import os, sys
import torch
import pace
from pace.train import main

seen, fast = [], []
forward = pace.PaceCriterion.forward

def recording(self, model, x, y, index=None, step=0):
    if self.mode == "fast":
        fast.append(self)
        seen.append(torch.as_tensor(index).cpu())
    return forward(self, model, x, y, index=index, step=step)

pace.PaceCriterion.forward = recording
dump = sys.argv[1]
code = main(sys.argv[2:])
os.makedirs(dump, exist_ok=True)
record = {
    "seen": torch.cat(seen),
    "bank": fast[-1].history_bank.detach().cpu(),
    "initial_seed": torch.initial_seed(),
    "world_size": int(os.environ["WORLD_SIZE"]),
}
torch.save(record, os.path.join(dump, "rank" + os.environ["RANK"] + ".pt"))
sys.exit(code)
"""


def test_torchrun_two_ranks_fast_bank_rows_are_the_seen_samples(tmp_path):
    out, dump = tmp_path / "out", tmp_path / "dump"
    driver = tmp_path / "driver.py"
    driver.write_text(RECORDING_DRIVER)
    cmd = [
        python(),
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(driver),
        str(dump),
        "--pace",
        "fast",
        "--epochs",
        "1",
        *SMALL_DEFAULT,
        "--shots",
        "5",
        "--out",
        str(out),
        "--device",
        "cpu",  # two ranks need not find two GPUs; gloo on CPU runs anywhere
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data-parallel: 2 processes (gloo)" in res.stderr
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # 25 training images: each rank gets 12, in two batches of 5 (the incomplete batch is dropped).
    assert r0["seen"].numel() == r1["seen"].numel() == 10
    seen = set(r0["seen"].tolist()) | set(r1["seen"].tolist())
    assert len(seen) == 20  # the ranks' shares are disjoint
    # Every rank holds the same, whole bank: its written rows are exactly the samples any rank saw.
    assert torch.equal(r0["bank"], r1["bank"])
    written = set(torch.nonzero(r0["bank"].abs().sum(1) > 0).flatten().tolist())
    assert written == seen
    # Noise streams differ per rank (seed + rank); only rank 0 wrote the checkpoint, with the bank in it.
    assert (r0["initial_seed"], r1["initial_seed"]) == (0, 1)
    ckpt = load_training_checkpoint(out / "PACE_fast" / "seed0" / "checkpoint.pt")
    assert torch.equal(ckpt["criterion"]["history_bank"], r0["bank"])
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert "PACE_fast" in res.stdout  # the table, printed once
    assert res.stdout.count("PACE_fast ") == 1


@pytest.mark.parametrize("choice", ["auto", "cuda"])
def test_more_local_ranks_than_gpus_is_a_usage_error(run_main, tmp_path, monkeypatch, choice):
    # A one-GPU machine under torchrun --nproc_per_node=2: rank 1 must not ask for cuda:1.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    res = run_main("--device", choice, *SMALL_DEFAULT, "--out", tmp_path / "o")
    assert res.code == 2, res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert lines == [
        f"pace-train: error: --device {choice}: LOCAL_RANK 1 but only 1 GPU(s) visible "
        "(start at most that many processes per node, or pass --device cpu)"
    ]
