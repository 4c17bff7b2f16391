"""The DP diagnosis: its probe separates what is separable, and it runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from simulations.bench import diagnose_dp


def test_probe_reads_a_separable_feature_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen)
    y = (x[:, 3] > 0).long()
    assert diagnose_dp.probe_accuracy(x[:300], y[:300], x[300:], y[300:], 2) >= 0.95
    noise_labels = torch.randint(0, 2, (400,), generator=gen)
    assert diagnose_dp.probe_accuracy(x[:300], noise_labels[:300], x[300:], noise_labels[300:], 2) < 0.7


@pytest.mark.slow
def test_tiny_diagnosis_report(tmp_path, tiny_bert, sst2):
    out = tmp_path / "diagnosis.json"
    diagnose_dp.main(
        [
            "--data",
            str(sst2),
            "--json",
            str(out),
            "--model",
            tiny_bert,
            "--site-examples",
            "64",
            "--probe-examples",
            "64",
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--max-length",
            "16",
            "--sigmas",
            "0",
        ]
    )
    report = json.loads(out.read_text())
    norms = report["grad_norms"]
    # Per sample, the whole gradient is at least as long as either part; so are the medians.
    assert norms["head"] > 0 and norms["adapters"] > 0
    assert norms["total"] >= max(norms["head"], norms["adapters"])
    assert set(report["linear_probe"]) == {"head_input", "cls", "mean"}
    assert all(0.0 <= acc <= 1.0 for acc in report["linear_probe"].values())
    sweep = report["noise_sweep"]
    assert [row["noise_multiplier"] for row in sweep[:1]] == [0.0]
    assert sweep[-1]["noise_multiplier"] == report["settings"]["planned_noise_multiplier"] > 0
