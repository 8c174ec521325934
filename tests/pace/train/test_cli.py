"""The command line: every flag documented, bad input gives one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess

import pytest
import torch

from .conftest import TINY_VIT, python, subprocess_env

ISSUE_FLAGS = [
    "--model",
    "--pretrained",
    "--checkpoint",
    "--data",
    "--split",
    "--adapter",
    "--rank",
    "--pace",
    "--lam",
    "--sigma",
    "--lazy-interval",
    "--copies",
    "--epochs",
    "--batch-size",
    "--lr",
    "--wd",
    "--warmup-epochs",
    "--drop-path",
    "--amp",
    "--compile",
    "--backend",
    "--seed",
    "--out",
    "--resume",
    "--eval-every",
    "--workers",
    "--export",
]


def test_help_documents_every_flag(run_main):
    from pace.train import build_parser

    res = run_main("--help")
    assert res.code == 0
    for flag in ISSUE_FLAGS:
        assert flag in res.out, flag
    for action in build_parser()._actions:
        if action.help != "==SUPPRESS==":
            assert action.help and len(action.help) > 10, action.option_strings


def test_python_m_entry_point():
    res = subprocess.run(
        [python(), "-m", "pace.train", "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert res.returncode == 0 and "--pace" in res.stdout


def _assert_usage_error(res, *words):
    assert res.code == 2, res
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res.err
    assert lines[0].startswith("pace-train: error:"), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in res.err


def test_missing_data_dir(run_main, tmp_path):
    _assert_usage_error(
        run_main("--data", tmp_path / "nope", "--out", tmp_path / "o"), "--data", "not a directory"
    )


def test_data_dir_without_known_layout(run_main, tmp_path):
    (tmp_path / "d").mkdir()
    _assert_usage_error(run_main("--data", tmp_path / "d", "--out", tmp_path / "o"), "neither a NOAH list")


def test_malformed_list_line(run_main, noah_dir, tmp_path):
    (noah_dir / "train800val200.txt").write_text("images/train800/000000.png\n")
    _assert_usage_error(run_main("--data", noah_dir, "--out", tmp_path / "o"), "train800val200.txt:1")


def test_non_integer_label(run_main, noah_dir, tmp_path):
    (noah_dir / "train800val200.txt").write_text("images/train800/000000.png cat\n")
    _assert_usage_error(run_main("--data", noah_dir, "--out", tmp_path / "o"), "not an integer")


def test_listed_image_missing(run_main, noah_dir, tmp_path):
    (noah_dir / "images" / "test" / "000001.png").unlink()
    _assert_usage_error(run_main("--data", noah_dir, "--out", tmp_path / "o"), "do not exist", "test.txt")


def test_unknown_model(run_main, noah_dir, tmp_path):
    _assert_usage_error(
        run_main("--data", noah_dir, "--model", "vit_nonexistent_9000", "--out", tmp_path / "o"),
        "unknown timm model",
    )


def test_unknown_adapter(run_main, tmp_path):
    _assert_usage_error(run_main("--adapter", "lora_xyz", "--out", tmp_path / "o"), "--adapter", "lora_xyz")


def test_unknown_pace_mode(run_main, tmp_path):
    _assert_usage_error(run_main("--pace", "turbo", "--out", tmp_path / "o"), "--pace")


def test_bad_model_kwargs(run_main, tmp_path):
    _assert_usage_error(run_main("--model-kwargs", "{depth: 2", "--out", tmp_path / "o"), "--model-kwargs")


def test_class_count_mismatch_flag(run_main, noah_dir, tmp_path):
    _assert_usage_error(
        run_main("--data", noah_dir, "--num-classes", "1", "--out", tmp_path / "o"), "class-count mismatch"
    )


def test_class_count_mismatch_between_splits(run_main, noah_dir, tmp_path):
    (noah_dir / "test.txt").write_text("images/test/000000.png 7\n")
    _assert_usage_error(
        run_main("--data", noah_dir, "--out", tmp_path / "o"), "class-count mismatch", "label 7"
    )


def test_class_count_mismatch_imagefolder(run_main, imagefolder_dir, tmp_path):
    extra = imagefolder_dir / "val" / "yak"
    extra.mkdir()
    (extra / "0.png").write_bytes((imagefolder_dir / "val" / "cat" / "0.png").read_bytes())
    _assert_usage_error(
        run_main("--data", imagefolder_dir, "--out", tmp_path / "o"), "class-count mismatch", "yak"
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_unreadable_checkpoint(run_main, noah_dir, tmp_path, suffix):
    bad = tmp_path / f"weights{suffix}"
    bad.write_bytes(b"this is not a checkpoint")
    res = run_main("--data", noah_dir, *TINY_VIT, "--checkpoint", bad, "--out", tmp_path / "o")
    _assert_usage_error(res, "--checkpoint", bad.name)


def test_checkpoint_with_pickled_code_is_refused(run_main, noah_dir, tmp_path):
    # weights_only=True: a .pth that needs arbitrary unpickling is rejected, not executed.
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": subprocess.Popen}, bad)
    res = run_main("--data", noah_dir, *TINY_VIT, "--checkpoint", bad, "--out", tmp_path / "o")
    _assert_usage_error(res, "--checkpoint", "cannot read")


def test_checkpoint_for_another_model(run_main, noah_dir, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    res = run_main("--data", noah_dir, *TINY_VIT, "--checkpoint", other, "--out", tmp_path / "o")
    _assert_usage_error(res, "no tensor that fits")


@pytest.mark.parametrize("workers, damage", [(0, "garbage"), (1, "truncated")])
def test_corrupt_image(run_main, noah_dir, tmp_path, workers, damage):
    # PIL fails while the DataLoader reads the batch; with --workers > 0 in a worker process, whose
    # exception torch re-raises in the trainer with the worker's traceback as its text.
    bad = noah_dir / "images" / "train800" / "000003.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    res = run_main(
        "--data",
        noah_dir,
        *TINY_VIT,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--workers",
        workers,
        "--threads",
        "1",
        "--no-progress",
        "--out",
        tmp_path / "o",
    )
    # The run had logged what it loaded before the bad file came up; the error is its last line.
    assert res.code == 2 and "Traceback" not in res.err, res.err
    errors = [line for line in res.err.splitlines() if line.startswith("pace-train:")]
    assert errors == [res.err.rstrip().splitlines()[-1]], res.err
    why = "not an image format PIL recognises" if damage == "garbage" else "OSError: image file is truncated"
    assert errors[0] == f"pace-train: error: --data: cannot read image {bad} ({why})"


def test_unreadable_resume_checkpoint(run_main, tmp_path):
    out = tmp_path / "o" / "baseline" / "seed0"
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    res = run_main("--pace", "none", "--resume", "--out", tmp_path / "o", "--repeats", "1", "--no-progress")
    _assert_usage_error(res, "--resume", "cannot read checkpoint")


def test_bad_input_in_a_real_process(noah_dir, tmp_path):
    """The console behaviour end to end: exit status 2, one line, no traceback."""
    res = subprocess.run(
        [
            python(),
            "-m",
            "pace.train",
            "--data",
            str(noah_dir),
            "--model",
            "nope_net",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "unknown timm model" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--epochs", "0"], ["--epochs", ">= 1"]),
        (["--copies", "1"], ["--copies", ">= 2"]),
        (["--sigma", "-1"], ["--sigma"]),
        (["--checkpoint", "x.pth"], ["--checkpoint", "need --data"]),
        (["--split", "train800", "--augment", "flip-crop"], ["--split, --augment", "only apply with --data"]),
    ],
)
def test_bad_numbers_and_combinations(run_main, tmp_path, argv, words):
    _assert_usage_error(run_main(*argv, "--out", tmp_path / "o"), *words)
