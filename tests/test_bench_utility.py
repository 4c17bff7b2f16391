"""The utility benchmark runs end to end on a tiny budget and writes its JSON and its plot."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from fedseal.common.config import FedConfig
from simulations.bench import utility as bench_utility

pytestmark = pytest.mark.slow


def test_tiny_utility_benchmark_report_and_plot(tmp_path, tiny_bert, sst2):
    out, png = tmp_path / "utility.json", tmp_path / "curve.png"
    bench_utility.main(
        [
            "--data",
            str(sst2),
            "--json",
            str(out),
            "--plot",
            str(png),
            "--model",
            tiny_bert,
            "--train-size",
            "240",
            "--sites",
            "2",
            "--rounds",
            "2",
            "--epsilons",
            "8",
            "--accountant",
            "rdp",
            "--repeats",
            "2",
            "--log-level",
            "WARNING",
        ]
    )
    report = json.loads(out.read_text())
    assert set(report["curve"]) == {"iid", "dirichlet"}
    for partition in ("iid", "dirichlet"):
        arms = report["arms"][partition]
        assert set(arms) == {"fed", "fed_dp_eps8"}
        assert arms["fed"]["epsilon_max"] is None  # the non-private arm spends nothing
        arm = arms["fed_dp_eps8"]
        assert 7.2 < arm["epsilon_max"] <= 8  # the whole budget, never more
        assert len(arm["accuracy_per_round"]) == 2
        # two runs on the same partition, pooled: the means of the runs, each round's range
        assert [len(r["accuracy_per_round"]) for r in arm["runs"]] == [2, 2]
        losses = [r["held_out_loss_per_round"] for r in arm["runs"]]  # the evaluation's cross-entropy
        assert [len(x) for x in losses] == [2, 2] and all(0 < x < math.inf for run in losses for x in run), (
            losses
        )
        assert arm["accuracy"] == pytest.approx(sum(r["accuracy"] for r in arm["runs"]) / 2, abs=1e-4)
        for k in range(2):
            accs = [r["accuracy_per_round"][k] for r in arm["runs"]]
            assert arm["spread"]["min"][k] == min(accs) and arm["spread"]["max"][k] == max(accs)
    assert report["fed_dp_acc"] == report["arms"]["iid"]["fed_dp_eps8"]["accuracy"]
    assert set(report["targets"]) >= {"fed_dp_acc_met", "dp_gap_met", "dp_gap"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(png)


def test_repeats_below_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_utility.main(["--data", str(tmp_path), "--json", str(tmp_path / "x.json"), "--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="train.tsv and dev.tsv"):
        bench_utility.main(["--data", str(tmp_path), "--json", str(tmp_path / "x.json")])


def test_an_unknown_finetune_mode_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_utility.main(
            ["--data", str(tmp_path), "--json", str(tmp_path / "x.json"), "--finetune", "probe,full"]
        )
    assert "unknown --finetune ['full']; use probe and/or lora" in capsys.readouterr().err


def _folder(path, train_rows, dev_rows):
    for name, rows in (("train", train_rows), ("dev", dev_rows)):
        (path / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_the_labels_are_the_data_folders_own_and_only_sst2s_get_its_targets(tmp_path):
    """A three-class folder in SST-2's layout gives its three names (SST-2's gives "0", "1"), and its
    report carries its own dev size and no SST-2 target."""
    data = _folder(
        tmp_path, ["a goal\tsport", "an album\tmusic", "a vote\tpolitics"], ["x\tsport", "y\tmusic"]
    )
    task = bench_utility.prepare(data, tmp_path / "work", None)
    assert (task.train_examples, task.dev_examples, task.labels, task.dev_file) == (
        3,
        2,
        ("music", "politics", "sport"),
        tmp_path / "dev.tsv",
    )
    assert task.train_file.exists()
    args = argparse.Namespace(
        model="m", data=data, sites=2, rounds=3, partitions=("iid",), alpha=0.5, epsilons=(8.0,), delta=1e-5,
        accountant="rdp", finetune=("probe",), seed=0, repeats=1, dp_noise=("local",), ddp_rounds=101,
    )  # fmt: skip
    report = bench_utility.summarise({"iid": {}}, args, task, FedConfig())
    assert "targets" not in report and "ddp_targets" not in report
    assert report["settings"]["dev_examples"] == 2
    sst2 = bench_utility.Task(task.train_file, task.dev_file, 3, 2, ("0", "1"))
    assert "targets" in bench_utility.summarise({"iid": {}}, args, sst2, FedConfig())


def test_a_dev_label_the_train_split_lacks_is_named_before_any_arm(tmp_path):
    data = _folder(tmp_path, ["a goal\tsport", "an album\tmusic"], ["x\tsport", "y\tfood"])
    with pytest.raises(
        SystemExit, match=r"the dev split does not fit the train split's labels \['music', 'sport'\]"
    ):
        bench_utility.prepare(data, tmp_path / "work", None)


def test_the_topics_tasks_jsonl_folder_is_data_too(tmp_path):
    """``python -m simulations.bench.topics --out DIR`` writes what ``--data DIR`` reads."""
    from simulations.bench import topics

    topics.main(["--out", str(tmp_path), "--train", "60", "--dev", "12"])
    task = bench_utility.prepare(tmp_path, tmp_path / "work", None)
    assert (task.train_examples, task.dev_examples, task.dev_file) == (60, 12, tmp_path / "dev.jsonl")
    assert set(task.labels) <= set(topics.TOPICS) and len(task.labels) >= 5


def test_a_folder_without_the_splits_is_named(tmp_path):
    with pytest.raises(
        SystemExit, match="neither train.tsv nor train.jsonl in .*: --data must be the SST-2 folder"
    ):
        bench_utility.prepare(tmp_path, tmp_path / "work", None)
