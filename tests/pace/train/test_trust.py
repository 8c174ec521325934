"""Runs a user can trust (issue 12): nothing saved is lost, a resume gives the uninterrupted result,
every failure is one line with an exit status of its own."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from pace.train.checkpoint import load_training_checkpoint
from pace.train.metrics import read_metrics, without_timing

from .conftest import SMALL_DEFAULT, TINY_VIT, python, subprocess_env
from .test_loop import poison_loss_at_step

# Three epochs of two steps (8 training images in batches of 4) of a one-block ViT.
TINY_RUN = [
    *TINY_VIT,
    "--epochs",
    "3",
    "--batch-size",
    "4",
    "--eval-every",
    "1",
    "--workers",
    "0",
    "--threads",
    "1",
    "--no-progress",
    "--pace",
    "pace",
]


def _one_line_error(res, code, *words):
    assert res.code == code, res
    lines = [line for line in res.err.splitlines() if line.startswith("pace-train:")]
    assert len(lines) == 1 and lines[0] == res.err.rstrip().splitlines()[-1], res.err
    assert "Traceback" not in res.err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _same_adapter(a, b):
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ------------------------------------------------------------------------------ nothing saved is lost
def test_rerun_into_a_finished_run_is_refused_unless_overwrite(run_main, noah_dir, tmp_path):  # item 1
    out = tmp_path / "o"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", out).code == 0
    before = (out / "metrics.jsonl").read_bytes()
    res = run_main("--data", noah_dir, *TINY_RUN, "--epochs", "1", "--out", out)
    _one_line_error(res, 2, "--out", "--resume", "--overwrite")
    assert (out / "metrics.jsonl").read_bytes() == before
    assert load_training_checkpoint(out / "checkpoint.pt")["epoch"] == 3
    res = run_main("--data", noah_dir, *TINY_RUN, "--epochs", "1", "--out", out, "--overwrite")
    assert res.code == 0, res.err
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "epoch"] == [1]


def test_resume_cuts_records_back_atomically_and_says_when_some_are_lost(run_main, noah_dir, tmp_path):  # 2
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", straight).code == 0
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", split, "--stop-after-epoch", "1").code == 0
    with open(split / "metrics.jsonl", "a") as f:  # a killed run's records after its checkpoint, torn
        f.write('{"type": "step", "epoch": 2, "step": 3, "loss": 0.5}\n{"type": "st')
    res = run_main("--data", noah_dir, *TINY_RUN, "--out", split, "--resume")
    assert res.code == 0 and "lost" not in res.err, res.err
    _same_adapter(straight, split)
    assert without_timing(read_metrics(split / "metrics.jsonl")) == without_timing(
        read_metrics(straight / "metrics.jsonl")
    )
    # Records deleted behind the trainer's back: the resume says so.
    again = tmp_path / "again"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", again, "--stop-after-epoch", "2").code == 0
    lines = (again / "metrics.jsonl").read_text().splitlines()
    (again / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    res = run_main("--data", noah_dir, *TINY_RUN, "--out", again, "--resume")
    assert res.code == 0 and "records are lost" in res.err, res.err


def test_one_run_per_folder_and_a_torn_last_line_is_read(run_main, noah_dir, tmp_path):  # item 3
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
        res = run_main("--data", noah_dir, *TINY_RUN, "--out", out)
    _one_line_error(res, 2, "in use by another pace-train run")
    assert not (out / "checkpoint.pt").exists()
    (out / "metrics.jsonl").write_text('{"type": "step", "step": 1}\n{"type": "st')
    assert read_metrics(out / "metrics.jsonl") == [{"type": "step", "step": 1}]


def test_stale_temporaries_are_removed_and_files_share_one_mode(run_main, noah_dir, tmp_path):  # item 4
    out = tmp_path / "o"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", out, "--stop-after-epoch", "1").code == 0
    stale = out / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half")
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", out, "--resume").code == 0
    assert not stale.exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert {"adapter.safetensors", "metrics.jsonl", "curves.png", "result.json", "checkpoint.pt"} <= set(
        modes
    )
    assert len(set(modes.values())) == 1, modes


# ------------------------------------------------------------------------- resume means the same result
@pytest.mark.parametrize(
    "change",
    [
        ["--drop-path", "0.2"],
        ["--augment", "flip-crop"],
        ["--normalize", "model"],
        ["--model-kwargs", json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4})],
    ],
)
def test_resume_refuses_any_flag_that_changes_the_result(run_main, noah_dir, tmp_path, change):  # item 5
    out = tmp_path / "o"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", out, "--stop-after-epoch", "1").code == 0
    res = run_main("--data", noah_dir, *TINY_RUN, *change, "--out", out, "--resume")
    _one_line_error(res, 2, "--resume", "was written with")


def test_resume_refuses_another_pretrained_backbone(run_main, tmp_path):  # item 5, built-in default
    args = [*SMALL_DEFAULT, "--pace", "none", "--epochs", "2", "--out", tmp_path]
    assert run_main(*args, "--stop-after-epoch", "1").code == 0
    cache = (tmp_path / "pretrain" / "backbone.safetensors").read_bytes()
    res = run_main(*args, "--resume", "--pretrain-epochs", "2")
    _one_line_error(res, 2, "--resume", "pretrain_epochs=1")
    assert (tmp_path / "pretrain" / "backbone.safetensors").read_bytes() == cache  # not pre-trained again


def test_augmentation_does_not_depend_on_workers(run_main, imagefolder_dir, tmp_path):  # item 6
    args = [
        "--data",
        imagefolder_dir,
        *TINY_RUN,
        "--epochs",
        "2",
        "--augment",
        "flip-crop",
        "--batch-size",
        "3",
    ]
    assert run_main(*args, "--out", tmp_path / "w0").code == 0
    res = run_main(*args, "--workers", "2", "--out", tmp_path / "w2")
    assert res.code == 0, res.err
    _same_adapter(tmp_path / "w0", tmp_path / "w2")


def test_resume_with_fewer_epochs_than_done_is_refused(run_main, noah_dir, tmp_path):  # item 7
    out = tmp_path / "o"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", out).code == 0
    res = run_main("--data", noah_dir, *TINY_RUN, "--epochs", "2", "--out", out, "--resume")
    _one_line_error(res, 2, "--resume", "epoch 3", "2 epoch")
    assert json.loads((out / "result.json").read_text())["epochs_done"] == 3


def test_after_a_nan_a_run_continues_with_new_optimisation_settings(
    run_main, noah_dir, tmp_path, monkeypatch
):
    out = tmp_path / "o"  # item 8
    with monkeypatch.context() as patch:
        poison_loss_at_step(patch, 3)  # the second step of epoch 2
        res = run_main("--data", noah_dir, *TINY_RUN, "--out", out)
    assert res.code == 1 and "non-finite loss" in res.err
    assert load_training_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    res = run_main("--data", noah_dir, *TINY_RUN, "--out", out, "--resume", "--lr", "1e-4")
    _one_line_error(res, 2, "--resume", "lr=0.001")
    res = run_main(
        "--data", noah_dir, *TINY_RUN, "--out", out, "--resume", "--resume-new-optim", "--lr", "1e-4"
    )
    assert res.code == 0, res.err
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7)) and all(r["lr"] <= 1e-4 for r in steps[2:])
    assert load_training_checkpoint(out / "checkpoint.pt")["fingerprint"]["lr"] == 1e-4


# ------------------------------------------------------------------------------ every failure is one line
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--img-size", "4"], ["--model", "patch size 8"]),
        (["--seed", str(2**70)], ["--seed"]),
        (["--lr", "1e308"], ["--lr"]),
    ],
)
def test_bad_numbers_are_usage_errors(run_main, noah_dir, tmp_path, argv, words):  # item 9
    res = run_main("--data", noah_dir, *TINY_RUN, *argv, "--out", tmp_path / "o")
    _one_line_error(res, 2, *words)


def test_unwritable_outputs_are_refused_before_training(run_main, noah_dir, tmp_path):  # item 9
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error(run_main("--data", noah_dir, *TINY_RUN, "--out", a_file), 2, "--out", "is a file")
    folder = tmp_path / "folder"
    folder.mkdir()
    res = run_main("--data", noah_dir, *TINY_RUN, "--out", tmp_path / "o", "--export", folder)
    _one_line_error(res, 2, "--export", "is a directory")
    assert not (tmp_path / "o").exists()  # refused before training, not after
    res = run_main(
        "--data", noah_dir, *TINY_RUN, "--out", tmp_path / "o", "--export", a_file / "m.safetensors"
    )
    _one_line_error(res, 2, "--export", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(run_main, noah_dir, tmp_path):  # item 9
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    _one_line_error(
        run_main("--data", noah_dir, *TINY_RUN, "--out", locked / "o"), 2, "--out", "not writable"
    )


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(run_main, noah_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"  # item 9
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError(
                "[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file"
            )
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    res = run_main("--data", noah_dir, *TINY_RUN, "--out", out)
    _one_line_error(res, 3, "I/O error", "cannot write", "stay intact")
    assert load_training_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "result.json"))

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr("pace.train.loop.atomic_write_text", enospc)
    res = run_main("--data", noah_dir, *TINY_RUN, "--out", out, "--resume")
    _one_line_error(res, 3, "No space left on device")


def test_partial_checkpoint_is_refused_unless_asked_for(run_main, noah_dir, tmp_path):  # item 10
    import timm

    other = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2
    )
    part = {k: v for k, v in other.state_dict().items() if k.startswith("blocks.0.attn")}
    save_file(part, tmp_path / "part.safetensors")
    args = ["--data", noah_dir, *TINY_RUN, "--epochs", "1", "--checkpoint", tmp_path / "part.safetensors"]
    _one_line_error(run_main(*args, "--out", tmp_path / "a"), 2, "--checkpoint", "would stay random")
    res = run_main(*args, "--partial-checkpoint", "--out", tmp_path / "b")
    assert res.code == 0 and "left as initialised" in res.err, res.err


def test_list_paths_may_not_leave_the_data_folder(run_main, noah_dir, tmp_path):  # item 12
    secret = tmp_path / "secret.png"
    shutil.copy(noah_dir / "images" / "test" / "000000.png", secret)
    for rel in ("../secret.png", str(secret)):
        (noah_dir / "train800val200.txt").write_text(f"images/train800/000000.png 0\n{rel} 1\n")
        res = run_main("--data", noah_dir, *TINY_RUN, "--out", tmp_path / "o")
        _one_line_error(res, 2, "--data", "leads outside the dataset folder")


# --------------------------------------------------------------------------------------- kill and resume
def test_killed_at_several_points_then_resumed_gives_the_uninterrupted_result(run_main, noah_dir, tmp_path):
    """SIGKILL a real run at a few moments (before its first checkpoint, right after one, later),
    resume it each time; the finished run equals one that was never interrupted."""
    run = ["--data", noah_dir, *TINY_RUN, "--epochs", "6"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_main(*run, "--out", straight).code == 0

    def epochs_done() -> int:
        try:
            return load_training_checkpoint(killed / "checkpoint.pt")["epoch"]
        except ValueError:  # absent, or caught being replaced: not yet
            return 0

    kill_points = (
        lambda: (killed / "metrics.jsonl").exists(),
        lambda: epochs_done() >= 2,
        lambda: epochs_done() >= 4,
    )
    args = [python(), "-m", "pace.train", *map(str, run), "--out", str(killed)]
    for attempt, kill_now in enumerate(kill_points):
        resume = ["--resume"] if attempt else []
        proc = subprocess.Popen([*args, *resume], env=subprocess_env(), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not kill_now() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_main(*run, "--out", killed, "--resume").code == 0
    _same_adapter(straight, killed)
    assert without_timing(read_metrics(killed / "metrics.jsonl")) == without_timing(
        read_metrics(straight / "metrics.jsonl")
    )
    assert not list(killed.glob(".*.tmp"))


def test_a_resumed_run_reports_what_the_uninterrupted_run_reports(run_main, noah_dir, tmp_path):
    """result.json after a resume (and after resuming a finished run) holds the uninterrupted
    run's numbers, including the held-out gradient norm averaged over every evaluation."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", straight).code == 0
    assert run_main("--data", noah_dir, *TINY_RUN, "--out", split, "--stop-after-epoch", "2").code == 0
    machine = ("seconds", "peak_mem_mb", "out_dir")

    def result(out):
        return {k: v for k, v in json.loads((out / "result.json").read_text()).items() if k not in machine}

    for _ in range(2):  # the second resume finds the run finished
        assert run_main("--data", noah_dir, *TINY_RUN, "--out", split, "--resume").code == 0
        assert result(split) == result(straight)
