"""The utility benchmark runs end to end on a tiny budget and reports every key."""

from __future__ import annotations

import json

import pytest

from simulations import bench_utility

pytestmark = pytest.mark.slow


def test_tiny_utility_benchmark_report(tmp_path, tiny_bert, sst2):
    out = tmp_path / "utility.json"
    bench_utility.main(["--data", str(sst2), "--json", str(out), "--model", tiny_bert,
                        "--train-size", "120", "--sites", "2", "--rounds", "1",
                        "--local-steps", "2", "--batch-size", "16", "--max-length", "16",
                        "--log-level", "WARNING"])
    report = json.loads(out.read_text())
    for key in ("central_acc", "fed_acc", "fed_dp_acc"):
        assert 0.0 <= report[key] <= 1.0
    assert 0 < report["epsilon_max"] <= 8.0
    assert report["seconds_per_round"] > 0 and report["dp_step_ratio"] > 0
    assert report["settings"]["steps_per_arm"] == 4 and report["arms"]["central"]["steps"] == 4
    assert set(report["targets"]) >= {"fed_dp_acc_met", "dp_gap_met", "dp_step_ratio_met"}


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="train.tsv and dev.tsv"):
        bench_utility.main(["--data", str(tmp_path), "--json", str(tmp_path / "x.json")])
