"""The SecAgg+ benchmark runs end to end (``--quick``) and reports sane numbers."""

from __future__ import annotations

import json

from fedseal.common.secagg import default_k
from simulations.bench.secagg import QUICK_NS, QUICK_SIZES, main

ROW_KEYS = {
    "size_name",
    "length",
    "n",
    "k",
    "threshold",
    "client_mask_s",
    "client_mask_method",
    "flower_mask_s",
    "speedup",
    "server_unmask_s",
    "server_unmask_reason",
    "server_exact",
    "bytes_per_client",
    "key_material_bytes",
    "plain_update_bytes",
    "bytes_ratio",
    "bytes_ratio_vs_plain",
    "client_round_s",
    "client_stage_s",
    "key_material_upload",
    "download_key_material_bytes",
}
STAGES = {"advertise", "share_keys", "masked_input", "sign_view", "unmask"}
UPLOADS = {"advert", "share_message", "ciphertexts", "complaints", "view_signature", "unmask"}


def test_quick_benchmark_report(tmp_path, capsys):
    out = tmp_path / "bench" / "secagg.json"
    assert main(["--quick", "--json", str(out), "--log-level", "WARNING"]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert {"machine", "results", "notes"} <= set(report)
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["numpy"]
    assert report["notes"]
    rows = report["results"]
    assert {(r["size_name"], r["n"]) for r in rows} == {(name, n) for name in QUICK_SIZES for n in QUICK_NS}
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["length"] == QUICK_SIZES[row["size_name"]]
        assert row["k"] == min(default_k(row["n"]), row["n"] - 1)
        for key in ("client_mask_s", "flower_mask_s", "server_unmask_s"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row[key])
        assert row["server_exact"] is True
        # The AES-CTR mask expansion must beat Flower's MT19937 pseudo_rand_gen.
        assert row["speedup"] == row["flower_mask_s"] / row["client_mask_s"]
        assert row["speedup"] > 1, row
        assert row["plain_update_bytes"] == 4 * row["length"] + 4
        assert row["bytes_per_client"] > row["plain_update_bytes"]
        assert row["bytes_per_client"] == row["plain_update_bytes"] + row["key_material_bytes"]
        assert row["bytes_ratio_vs_plain"] > 1
        assert abs(row["bytes_ratio"] - 1) < 1e-12
        # the whole round's client cost, stage by stage, with signatures and the view check
        assert set(row["client_stage_s"]) == STAGES
        assert row["client_round_s"] == sum(row["client_stage_s"].values())
        assert row["client_stage_s"]["masked_input"] == row["client_mask_s"]
        assert set(row["key_material_upload"]) == UPLOADS
        assert row["key_material_bytes"] == sum(row["key_material_upload"].values())
        assert row["download_key_material_bytes"] > row["key_material_upload"]["advert"]
