"""End-to-end federations: DP-SGD at every site, secure aggregation, real models.

* through Flower's Simulation Engine (Ray) via the real ``fedseal simulate`` CLI;
* through the in-process grid (real ClientApp and messages): learning with and
  without secure aggregation, MiniLM learning at epsilon 8, and MiniLM on SST-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedseal.common.config import FedConfig
from fedseal.server.app import run_federation
from fedseal.simulations.simulate import prepare_sites
from simulations.bench.local_grid import RUN_ID, LocalGrid

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _predicts(model_dir: Path, texts: list[str]) -> list[str]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tok(texts, return_tensors="pt", padding=True)).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def test_simulate_cli_on_ray_with_dp_and_secagg(tiny_bert, tmp_path):
    """The real CLI, Flower's Ray engine, DP and SecAgg+ on: accounting and outputs."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseal.common.cli",
            "simulate",
            "--model",
            tiny_bert,
            "--finetune",
            "full",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--local-steps",
            "4",
            "--batch-size",
            "16",
            "--max-length",
            "24",
            "--epsilon",
            "4",
            "--delta",
            "1e-4",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out / "metrics.jsonl") in proc.stdout and str(out / "model") in proc.stdout
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["private"] and row["secagg"] and len(row["contributors"]) == 3
        assert len(row["epsilon"]) == 3
        assert all(0 < eps <= 4.0 for eps in row["epsilon"].values())
        assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
    # The whole planned budget is used by the last planned round, never exceeded.
    assert all(eps > 0.8 * 4.0 for eps in rows[-1]["epsilon"].values())
    assert all(rows[1]["epsilon"][s] > rows[0]["epsilon"][s] for s in rows[0]["epsilon"])
    assert set(_predicts(out / "model", ["a great movie", "a dull movie"])) <= {"negative", "positive"}
    assert json.loads((out / "summary.json").read_text())["epsilon_max"] <= 4.0


def test_tiny_bert_learns_with_and_without_secagg_alike(tiny_bert, tmp_path):
    """Secure aggregation changes nothing but quantisation: both runs learn alike.

    Non-private (the tiny random BERT does not learn under DP noise),
    and every output says so.
    """
    final = {}
    for secagg in (False, True):
        out = tmp_path / f"secagg-{secagg}"
        cfg = prepare_sites(
            FedConfig(
                model=tiny_bert,
                finetune="full",
                dp=False,
                secagg=secagg,
                clients=3,
                rounds=4,
                local_steps=40,
                lr=2e-3,
                max_length=24,
                out=str(out),
            )
        )
        summary = run_federation(LocalGrid(3), cfg, run_id=RUN_ID)
        rows = _rows(out)
        assert summary["final_accuracy"] > 0.7, rows
        assert all("NON-PRIVATE" in row["privacy"] and row["epsilon"] == {} for row in rows)
        assert "NON-PRIVATE" in summary["privacy"]
        final[secagg] = summary["final_accuracy"]
    assert abs(final[True] - final[False]) <= 0.1, final


def test_minilm_learns_under_dp_and_secagg(tmp_path):
    """The default job's setting: packaged MiniLM, epsilon 8 per site, SecAgg+."""
    cfg = prepare_sites(FedConfig(clients=3, rounds=3, max_length=32, out=str(tmp_path)))
    summary = run_federation(LocalGrid(3), cfg, run_id=RUN_ID)
    rows = _rows(tmp_path)
    assert summary["final_accuracy"] > 0.7, [(r["accuracy"], r["loss"]) for r in rows]
    assert all(0 < eps <= 8.0 for row in rows for eps in row["epsilon"].values())
    assert all(eps > 0.8 * 8.0 for eps in rows[-1]["epsilon"].values())
