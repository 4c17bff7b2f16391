"""The scale benchmark runs end to end on a tiny model and accounts for every message."""

from __future__ import annotations

import json

from fedseal.common.secagg import default_k
from simulations.bench.scale import CLIENT_PHASES, SECAGG_STAGES, main


def test_scale_benchmark_reports_every_round_phase_and_the_secagg_growth(tiny_bert, tmp_path, capsys):
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    assert (
        main(
            [
                "--sites",
                "3,6",
                "--engines",
                "local",
                "--rounds",
                "2",
                "--model",
                tiny_bert,
                "--json",
                str(out),
                "--plot",
                str(png),
                "--keep",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["engine"], r["sites"], r["k"]) for r in report["runs"]] == [
        ("local", 3, default_k(3)),
        ("local", 6, default_k(6)),
    ]
    named = {phase for phase, _, _ in CLIENT_PHASES}
    for run in report["runs"]:
        assert len(run["round_seconds"]) == 2 and run["cpu_seconds"] > 0 and run["peak_rss_mib"] > 0
        statistics, training = run["rounds"]
        for row in run["rounds"]:
            # every site's five messages of the round were timed, and nothing else
            assert row["site_messages"] == run["sites"] * (1 + len(SECAGG_STAGES))
            assert row["contributors"] == run["sites"] and not row["abandoned"]
            assert set(row["train_per_site"]["cpu"]) <= named | {"other"}
            assert row["secagg"]["cpu"]["per_site"] > 0
            assert row["server"]["cpu"]["secagg finalize"] > 0
        assert "statistics release" in statistics["train_per_site"]["wall"]
        assert "dp steps" in training["train_per_site"]["wall"]
        assert "dp steps" not in statistics["train_per_site"]["wall"]
    import fedseal.client.training
    import fedseal.server.app

    # the instrumentation is gone once the benchmark returns
    assert not hasattr(fedseal.client.training.global_model, "_fedseal_phase")
    assert not hasattr(fedseal.server.app.send, "_fedseal_phase")
    assert fedseal.server.app.save_checkpoint.__module__ == "fedseal.server.checkpoint"
    fit = report["secagg_per_site"]["local"]
    assert [p["sites"] for p in fit["points"]] == [3, 6]
    assert fit["growth"]["sites"] == 2.0 and fit["growth"]["cpu_seconds_per_site"] > 0
