"""Issue 15: the digits experiment reports what the paper measures (held-out gradient norm and
FP-distance, apart from the training objective's gradient norm), tests once on digits disjoint
from the validation digits, compares methods draw by draw, and runs the search and the lambda
sweep (Fig. 4) as commands."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pace.train import studies
from pace.train.default import digits_tensors, split_new_task
from pace.train.loop import RunResult
from pace.train.metrics import read_metrics

from .conftest import SMALL_DEFAULT
from .test_cli import _assert_usage_error


def _ids(ds, x_all):
    # which of the 1797 digits a split holds (each image is unique up to a handful of duplicates)
    flat = x_all.flatten(1)
    return {int((flat == img.flatten()).all(1).nonzero()[0]) for img in ds.x}


def test_validation_and_test_digits_are_disjoint_and_the_test_half_is_fixed():
    x, y = digits_tensors(8)
    a, b = split_new_task(x, y, 10, seed=0), split_new_task(x, y, 10, seed=1)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)  # the same test set
    assert not torch.equal(a.train.x, b.train.x)  # another draw of the shots
    train, val, test = (_ids(d, x) for d in (a.train, a.val, a.test))
    assert not (train & test) and not (val & test) and not (train & val)
    assert len(a.train) == 50 and len(a.val) + len(a.test) + 50 == int((y >= 5).sum())
    assert sorted(a.train.y.tolist()) == sorted([c for c in range(5) for _ in range(10)])


def _result(test_acc: float) -> RunResult:
    values = dict.fromkeys(RunResult.__dataclass_fields__, 0.0)
    values.update(label="x", test_acc=test_acc, finished=True, out_dir="", steps=0, epochs_done=0)
    return RunResult(**values)


def test_table_shows_paired_differences_with_a_t_interval():
    rows = [
        studies.MethodRuns("baseline", [_result(a) for a in (0.50, 0.60, 0.70)]),
        studies.MethodRuns("PACE", [_result(a) for a in (0.55, 0.62, 0.78)]),
    ]
    paired = studies.paired_summary(rows)["PACE"]
    assert paired["test_acc_diff_per_draw"] == pytest.approx([0.05, 0.02, 0.08])
    # mean 5 points, sd 3 points, t(0.975, 2) = 4.3027: half-width 4.3027 * 3 / sqrt(3) = 7.45 points
    assert paired["mean"] == pytest.approx(0.05)
    assert paired["ci95_half_width"] == pytest.approx(4.302653 * 0.03 / math.sqrt(3), rel=1e-5)
    table = studies.format_table(rows, torch.device("cpu"))
    assert "+5.00 +- 7.45" in table and "+5.0 +2.0 +8.0" in table


def test_default_summary_names_each_diagnostic(run_main, tmp_path):
    res = run_main(*SMALL_DEFAULT, "--pace", "pace", "--epochs", "2", "--repeats", "2", "--out", tmp_path)
    assert res.code == 0, res.err
    assert "val gnorm" in res.out and "train-obj gnorm" in res.out and "diff (mean+-95% CI)" in res.out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hyperparameters"]["PACE"] == {"sigma": 0.5, "lam": 2.0}  # the searched defaults
    for run in summary["results"]["PACE"]:
        for key in ("val_grad_norm", "val_grad_norm_mean", "train_objective_grad_norm", "val_fp_distance"):
            assert run[key] > 0, key
        assert 0 <= run["test_acc"] <= 1 and 0 <= run["val_acc"] <= 1
        records = read_metrics(f"{run['out_dir']}/metrics.jsonl")
        evals = [r for r in records if r["type"] == "eval"]
        assert len(evals) == 2 and all(r["val_grad_norm"] > 0 for r in evals)
        assert run["val_grad_norm_mean"] == pytest.approx(sum(r["val_grad_norm"] for r in evals) / 2)
        assert run["val_grad_norm"] == evals[-1]["val_grad_norm"]
        assert [r["type"] for r in records].count("test") == 1  # the test digits, scored once
        assert all("train_objective_grad_norm" in r for r in records if r["type"] == "step")


def test_sweep_lam_writes_fig4_for_each_objective(run_main, tmp_path):
    res = run_main(
        *SMALL_DEFAULT, "--sweep-lam", "0.1,10", "--pace", "pace,fpa", "--epochs", "1", "--out", tmp_path
    )
    assert res.code == 0, res.err
    sweep = json.loads((tmp_path / "sweep_lam.json").read_text())
    assert [(p["method"], p["lam"]) for p in sweep["points"]] == [
        ("PACE", 0.1),
        ("PACE", 10.0),
        ("fpa", 0.1),
        ("fpa", 10.0),
    ]
    assert all(v > 0 for p in sweep["points"] for v in p["val_grad_norm_mean_per_draw"])
    assert (tmp_path / "sweep_lam.png").stat().st_size > 10_000


def test_search_chooses_on_validation_and_prints_its_choice(run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "SEARCH_LRS", (1e-3, 1e-2))
    monkeypatch.setattr(studies, "SEARCH_SIGMAS", (1.0,))
    monkeypatch.setattr(studies, "SEARCH_LAMS", (0.5, 2.0))
    monkeypatch.setattr(studies, "SEARCH_MODES", (("PACE", "pace"),))
    res = run_main(*SMALL_DEFAULT, "--search", "--epochs", "1", "--out", tmp_path)
    assert res.code == 0, res.err
    record = json.loads((tmp_path / "search.json").read_text())
    assert record["seeds"] == [1000]  # draws of its own
    assert len(record["tried"]) == 4 and "chosen:" in res.out
    best_lr = max((t for t in record["tried"] if t["method"] == "baseline"), key=lambda t: t["val_acc"])
    assert record["chosen"]["lr"] == best_lr["lr"]
    for t in record["tried"]:  # scored on the validation digits, never tested
        folder = next((tmp_path / "search").glob(f"*lr{t['lr']:g}*"))
        for records in (read_metrics(p) for p in folder.rglob("metrics.jsonl")):
            assert not any(r["type"] == "test" for r in records)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--pace", "pace,fpa"], ["--pace", "--sweep-lam"]),
        (["--pace", "turbo,pace", "--sweep-lam", "1"], ["--pace", "turbo"]),
        (["--sweep-lam", "1,x"], ["--sweep-lam", "numbers"]),
        (["--sweep-lam", "0,1"], ["--sweep-lam", "> 0"]),
        (["--sweep-lam", "1", "--pace", "none"], ["--sweep-lam", "none"]),
        (["--search", "--data", "somewhere"], ["--search", "--data"]),
    ],
)
def test_study_flags_refuse_bad_input(run_main, tmp_path, args, words):
    _assert_usage_error(run_main(*args, "--out", tmp_path / "o"), *words)
