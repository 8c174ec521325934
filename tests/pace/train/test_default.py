"""The built-in default (shrunk): every variant runs, the table prints, every output file is written."""

from __future__ import annotations

import json

from pace.train.metrics import read_metrics

from .conftest import SMALL_DEFAULT


def test_default_runs_every_variant_and_prints_the_table(run_main, tmp_path):
    res = run_main(
        *SMALL_DEFAULT, "--repeats", "2", "--epochs", "1", "--out", tmp_path
    )  # the last --repeats wins
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert "acc % (mean+-sd)" in lines[header] and "FP-dist" in lines[header] and "seconds" in lines[header]
    rows = [line.split()[0] for line in lines[header + 2 : header + 6]]
    assert rows == ["baseline", "PACE", "PACE_fast", "PACE_lazy"]
    assert (tmp_path / "summary.txt").read_text().count("\n") >= 6
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["results"]) == set(rows)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "pretrain" / "backbone.safetensors").is_file()
    for name in rows:
        for seed in (0, 1):
            run = tmp_path / name / f"seed{seed}"
            for f in ("metrics.jsonl", "adapter.safetensors", "adapter.json", "curves.png", "checkpoint.pt"):
                assert (run / f).is_file(), (name, seed, f)
            records = read_metrics(run / "metrics.jsonl")
            assert [r["type"] for r in records].count("eval") == 1
    # The baseline has no consistency term; PACE's copies do.
    base = read_metrics(tmp_path / "baseline" / "seed0" / "metrics.jsonl")
    paced = read_metrics(tmp_path / "PACE" / "seed0" / "metrics.jsonl")
    assert all(r["consistency"] == 0 for r in base if r["type"] == "step")
    assert all(r["consistency"] > 0 for r in paced if r["type"] == "step")
    assert "using the cached" not in res.err
    # A second invocation reuses the cached backbone.
    res = run_main(*SMALL_DEFAULT, "--pace", "none", "--epochs", "1", "--out", tmp_path, "--overwrite")
    assert res.code == 0 and "using the cached pre-trained backbone" in res.err
