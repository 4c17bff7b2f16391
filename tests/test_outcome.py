"""A run that produced nothing is a failure: the rule, and what the operator sees."""

from __future__ import annotations

import json

import pytest

from fedseal.server.outcome import MAX_ABANDONED, run_failure


def _row(rnd: int, contributors=("a", "b"), abandoned: str = "") -> dict:
    return {"round": rnd, "contributors": list(contributors), "abandoned": abandoned}


def test_a_run_with_no_contribution_or_mostly_abandoned_training_fails():
    assert run_failure([], 1) == "no round ran"
    nobody = [_row(1, ()), _row(2, ())]
    assert "no site contributed" in run_failure(nobody, 1)
    # the statistics round is not a training round: one of two training rounds lost is fine
    half = [_row(1), _row(2), _row(3, (), "too few live share holders")]
    assert MAX_ABANDONED == 0.5 and run_failure(half, 1) is None
    most = [_row(1), _row(2, (), "x"), _row(3, (), "too few"), _row(4)]
    assert run_failure(most, 0) is None  # 2 of 4 is not more than half
    worst = [_row(1), _row(2, (), "too few"), _row(3, (), "too few")]
    reason = run_failure(worst, 1)
    assert reason.startswith("2 of 2 training rounds were abandoned") and "untrained" in reason
    assert "the first: too few" in reason
    assert "barely trained" in run_failure([_row(1), _row(2, (), "x"), _row(3, (), "y"), _row(4)], 1)
    assert run_failure([_row(1), _row(2)], 1) is None


@pytest.mark.slow
def test_a_simulation_where_every_site_refuses_exits_1_and_says_so_first(tiny_bert, tmp_path, capsys):
    from fedseal.simulations.simulate import main

    out = tmp_path / "out"
    # a budget too small for any site to train one step: each refuses every round
    code = main(
        [
            "--model",
            tiny_bert,
            "--clients",
            "3",
            "--rounds",
            "2",
            "--epsilon",
            "0.001",
            "--max-length",
            "16",
            "--out",
            str(out),
        ]
    )
    said = capsys.readouterr().out
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"].startswith("no site contributed to any round")
    assert said.lstrip().startswith("fedseal simulate: the run FAILED: no site contributed")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.index("RUN FAILED") < page.index("<h2>Summary</h2>")
