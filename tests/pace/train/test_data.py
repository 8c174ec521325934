"""Datasets: NOAH lists and ImageFolder trees train end to end; list parsing; the batch sampler."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pace.train.data import load_folder_data, read_list, train_batch_sampler
from pace.train.metrics import read_metrics, without_timing

from .conftest import TINY_VIT

ONE_STEP = [
    *TINY_VIT,
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--workers",
    "0",
    "--threads",
    "1",
    "--no-progress",
]
# Two epochs of two steps (8 training images in batches of 4), evaluating after each.
TWO_EPOCHS = [
    *TINY_VIT,
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--eval-every",
    "1",
    "--workers",
    "0",
    "--threads",
    "1",
    "--no-progress",
]


def _check_run_outputs(out, n_steps):
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(steps) == n_steps
    assert all(r["train_objective_grad_norm"] > 0 for r in steps)
    assert len(evals) == 1 and 0 <= evals[0]["val_acc"] <= 1 and evals[0]["val_fp_distance"] >= 0
    assert evals[0]["val_grad_norm"] > 0 and evals[0]["val_loss"] > 0
    for name in ("adapter.safetensors", "adapter.json", "curves.png", "checkpoint.pt", "result.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter.json").read_text())["config"]["adapter"] == "lora_mul_vpt_add"


def test_noah_folder_trains_one_step(run_main, noah_dir, tmp_path):
    res = run_main("--data", noah_dir, *ONE_STEP, "--pace", "fast", "--out", tmp_path / "o")
    assert res.code == 0, res.err
    _check_run_outputs(tmp_path / "o", 1)
    assert "NOAH lists train800val200.txt (8 images) / test.txt (4 images), 2 classes" in res.err


def test_imagefolder_trains_one_step(run_main, imagefolder_dir, tmp_path):
    res = run_main(
        "--data",
        imagefolder_dir,
        *ONE_STEP,
        "--augment",
        "flip-crop",
        "--pace",
        "pace",
        "--out",
        tmp_path / "o",
    )
    assert res.code == 0, res.err
    _check_run_outputs(tmp_path / "o", 1)
    assert "ImageFolder train/ (9 images) / val/ (3 images), 3 classes" in res.err


def test_noah_split_choice(noah_dir):
    bundle = load_folder_data(str(noah_dir), "train800", None, 16, "none")
    assert len(bundle.train) == 6 and len(bundle.eval) == 2  # train800 pairs with val200
    x, y, i = bundle.train[3]
    assert x.shape == (3, 16, 16) and y == 1 and i == 3


def test_list_paths_relative_to_images_folder(tmp_path, noah_dir):
    # The few-shot lists (and the PACE code's reader) name images relative to images/.
    (noah_dir / "annotations").mkdir()
    (noah_dir / "annotations" / "train_meta.list.num_shot_1.seed_0").write_text("train800/000001.png 1\n")
    bundle = load_folder_data(str(noah_dir), "train_meta.list.num_shot_1.seed_0", "test", 16, "none")
    assert bundle.train.samples[0][0] == noah_dir / "images" / "train800" / "000001.png"


def test_read_list_skips_blank_and_comment_lines(noah_dir):
    lst = noah_dir / "custom.txt"
    lst.write_text("# header\n\nimages/test/000000.png 0\n  images/test/000001.png 1  \n")
    assert [y for _, y in read_list(noah_dir, lst)] == [0, 1]


def test_negative_label_is_rejected(noah_dir):
    lst = noah_dir / "custom.txt"
    lst.write_text("images/test/000000.png -1\n")
    with pytest.raises(ValueError, match="negative"):
        read_list(noah_dir, lst)


@pytest.mark.parametrize("n, bs, world", [(25, 5, 2), (24, 5, 3), (7, 10, 2), (10, 3, 1)])
def test_sharded_batch_sampler(n, bs, world):
    shards = []
    for rank in range(world):
        sampler = train_batch_sampler(n, bs, 3, rank, world)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert len({len(b) for b in batches}) == 1  # equal batches: all_gather needs equal shapes
        shards.append([i for b in batches for i in b])
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))  # no sample twice in an epoch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    assert set(flat) <= set(perm[: world * (n // world)])


def test_sampler_order_follows_seed_and_epoch():
    s = train_batch_sampler(20, 4, 0)
    first = list(s)
    s.sampler.set_epoch(1)
    second = list(s)
    assert first != second  # a new order each epoch
    s.sampler.set_epoch(0)
    assert list(s) == first == list(train_batch_sampler(20, 4, 0))


def _same_files(a, b):
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ma, mb = (without_timing(read_metrics(d / "metrics.jsonl")) for d in (a, b))
    assert ma == mb


def test_data_run_without_checkpoint_is_reproducible_and_resumes_exactly(run_main, noah_dir, tmp_path):
    # No --checkpoint / --pretrained: the frozen backbone is random, so it must come from --seed,
    # or a second run (and a --resume, which rebuilds it) trains a different network.
    args = ["--data", noah_dir, *TWO_EPOCHS, "--pace", "pace"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    torch.manual_seed(123)  # whatever the global stream holds before the run must not matter
    assert run_main(*args, "--out", straight).code == 0
    res = run_main(*args, "--out", split, "--stop-after-epoch", "1")
    assert res.code == 0, res.err
    torch.manual_seed(456)
    res = run_main(*args, "--out", split, "--resume")
    assert res.code == 0 and "resumed from" in res.err, res.err
    _same_files(straight, split)


def test_evaluation_does_not_shift_the_noise(run_main, noah_dir, tmp_path):
    # Evaluating must not draw from the global torch stream the PACE noise comes from: training
    # with --eval-every 1 or 2 (and so a --resume that changes it) gives the same adapter.
    args = ["--data", noah_dir, *TWO_EPOCHS, "--pace", "pace"]
    every1, every2 = tmp_path / "every1", tmp_path / "every2"
    assert run_main(*args, "--out", every1).code == 0
    assert run_main(*args, "--eval-every", "2", "--out", every2).code == 0
    a, b = (load_file(d / "adapter.safetensors") for d in (every1, every2))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [[r for r in read_metrics(d / "metrics.jsonl") if r["type"] == "step"] for d in (every1, every2)]
    assert without_timing(steps[0]) == without_timing(steps[1])
