"""``fedseal audit``: the bound's arithmetic, the attacks, and the audit of a real site.

The end-to-end tests run the real ClientApp (over the in-process grid, real
Flower messages from the audit's honest server, real Opacus, a real ledger)
with a tiny BERT. With the old plain reply's training loss put back behind a
switch that exists only in this file, the audit flags that field; without it,
no field of the site's replies is flagged.

Why this run's settings make the old loss a reliable leak (the power behind
``RUNS``): the model is a tiny BERT already fitted to the site's task
(:func:`fitted_bert`), trained in full at a learning rate that leaves it where it
is, so every sampled batch's loss is that of a model that gets the site's 50
examples right (about 5e-4 each) except the canary, whose positive words carry
a negative label (a loss of about 7.6). The site's Poisson batches (rate 1/2)
hold about 25 examples, so a batch with the canary has a mean loss near 0.29,
and a run's reported mean over its 20 steps is about 0.0146 k for the k ~
Binomial(20, 1/2) batches that held the canary, against about 5e-4 in every run
without it. The threshold fitted on the 8 calibration runs of each arm lies
between the two, at most halfway to the smallest k seen there, so a test run
with the canary is missed with probability about 0.003 (summed over k and the
calibration's smallest k), and two misses among 8 (which would leave the bound
below the budget) have probability about 2e-4. 8 of 8 with no false alarm
proves epsilon 0.54 at 95% confidence and 7 of 8 proves 0.25, both above the
accounted 0.1. The site's DP noise comes from the OS on purpose (nothing here
seeds it); the data and the model are seeded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedseal.common import egress
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.data import Examples
from fedseal.common.synthetic import FILLER, LABEL_NAMES, NEGATIVE, POSITIVE
from fedseal.simulations import audit

RUNS = 16  # per arm: 8 calibrate, 8 test (see the module docstring)
EPSILON = 0.1
LOSS_FIELD = "train r1 metrics[train-loss]"


# -- the bound's arithmetic ---------------------------------------------------------------------


def test_clopper_pearson_matches_the_beta_quantiles():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1)]:
        lower, upper = audit.clopper_pearson(k, n, 0.05)
        expect_lower = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
        expect_upper = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
        assert lower == pytest.approx(expect_lower, abs=1e-9)
        assert upper == pytest.approx(expect_upper, abs=1e-9)


def test_clopper_pearson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        audit.clopper_pearson(11, 10, 0.05)


def test_the_bound_of_perfect_separation_and_of_none():
    perfect = audit.epsilon_bound(10, 10, 0, 10, 0.0, 0.95)
    edge = 0.025 ** (1 / 10)  # the one-sided 2.5% end of 10 successes in 10
    assert perfect.tpr_lower == pytest.approx(edge)
    assert perfect.fpr_upper == pytest.approx(1 - edge)
    assert perfect.epsilon == pytest.approx(math.log(edge / (1 - edge)))
    assert audit.epsilon_bound(5, 10, 5, 10, 0.0, 0.95).epsilon == 0.0
    # delta comes off the true positive rate: a delta this large proves nothing.
    assert audit.epsilon_bound(10, 10, 0, 10, edge, 0.95).epsilon == 0.0
    # The symmetric bound (true negatives over false negatives) proves more where a test fires
    # on every canary run and half the others.
    half = audit.epsilon_bound(40, 40, 20, 40, 0.0, 0.95)
    assert half.epsilon == pytest.approx(math.log((1 - half.fpr_upper) / (1 - half.tpr_lower)))
    assert half.epsilon > math.log(half.tpr_lower / half.fpr_upper) + 0.5


# -- the attacks ----------------------------------------------------------------------------------


def _attack(values_in, values_out, accounted=0.5):
    return audit.attack_field(
        "f", "dp-release", values_in, values_out, len(values_in) // 2, 0.0, 0.95, accounted
    )


def test_a_number_that_moves_with_the_canary_is_flagged_and_a_constant_is_not():
    rng = np.random.default_rng(0)
    moved = _attack(list(rng.normal(5, 1, 20)), list(rng.normal(-5, 1, 20)))
    assert (moved.attack, moved.true_positives, moved.false_positives) == ("value", 10, 0)
    assert moved.flagged and moved.epsilon_lower_bound == pytest.approx(0.807, abs=1e-3)
    lower = _attack(list(rng.normal(-5, 1, 20)), list(rng.normal(5, 1, 20)))
    assert lower.flagged  # either direction
    constant = _attack([0.25] * 20, [0.25] * 20)
    assert constant.epsilon_lower_bound == 0.0 and not constant.flagged


def test_an_array_is_attacked_along_its_in_minus_out_mean():
    rng = np.random.default_rng(1)
    shift = np.zeros(50)
    shift[7] = 6.0
    result = _attack(
        [rng.normal(size=50) + shift for _ in range(20)], [rng.normal(size=50) for _ in range(20)]
    )
    assert result.attack == "projection" and result.flagged
    noise = _attack([rng.normal(size=50) for _ in range(20)], [rng.normal(size=50) for _ in range(20)])
    assert not noise.flagged


def test_a_field_present_only_with_the_canary_is_flagged():
    """A refusal that only the canary provokes: the reply field's value, or a field's presence."""
    result = _attack(["'refusal'"] * 20, ["'training'"] * 20)
    assert result.attack == "frequency" and result.flagged
    present = _attack([0.3] * 20, [None] * 20)
    assert present.attack == "frequency" and present.flagged


def test_the_canary_must_not_move_the_site_into_another_size_bucket():
    examples = Examples(["a"] * 127, [0] * 127, LABEL_NAMES, "t")
    with pytest.raises(ConfigError, match="size bucket"):
        audit.with_canary(examples, audit.default_canary(LABEL_NAMES))
    with pytest.raises(ConfigError, match="not one of the site's labels"):
        audit.with_canary(examples.subset(range(100)), audit.Canary("x", "neutral"))


# -- the audit of a real site ---------------------------------------------------------------------


def _clean_examples(n: int, seed: int) -> Examples:
    """Sentences of four filler words and two words of their label's polarity (no label noise)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        words = [*rng.choice(FILLER, 4), *rng.choice(POSITIVE if label else NEGATIVE, 2)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return Examples(texts, labels, LABEL_NAMES, f"clean(n={n}, seed={seed})")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine two threads ran these runs several times
    slower (the fitting below took 110 s with two, 9 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted_bert(tmp_path_factory, tiny_bert) -> str:
    """The tiny BERT, its classifier fitted (no noise, seeded) to the clean task; no dropout."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("fitted-bert")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert,
        num_labels=2,
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: i for i, name in enumerate(LABEL_NAMES)},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    train = _clean_examples(1024, seed=7)
    inputs = tokenizer(train.texts, padding=True, return_tensors="pt")
    labels = torch.tensor(train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch = torch.randint(0, len(labels), (64,))
        loss = model(
            input_ids=inputs["input_ids"][batch],
            attention_mask=inputs["attention_mask"][batch],
            labels=labels[batch],
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def old_training_loss(monkeypatch):
    """TEST ONLY: the plain training reply carries the mean training loss again, declared as a
    DP release (as a reply that trusted it would declare it)."""
    from fedseal.client import probe, trainer

    loss = egress.Field(
        egress.METRICS,
        "train-loss",
        egress.Form.FLOAT,
        egress.Kind.RELEASE,
        "the mean cross-entropy of the round's batches (the old plain reply)",
    )
    patched = {
        name: egress.ReplyType(t.name, (*t.fields, loss))
        for name, t in (("TRAINING", egress.TRAINING), ("VOTE", egress.VOTE))
    }
    last = {}

    def keeping_loss(train):
        def run(*args, **kwargs):
            result = train(*args, **kwargs)
            last["loss"] = result.mean_loss
            return result

        return run

    build = egress.build

    def build_with_loss(reply_type, msg, values):
        if reply_type in patched.values():
            values = {**values, egress.METRICS: {**values[egress.METRICS], "train-loss": last["loss"]}}
        return build(reply_type, msg, values)

    for name, reply_type in patched.items():
        monkeypatch.setattr(egress, name, reply_type)
    monkeypatch.setattr(trainer, "train_local", keeping_loss(trainer.train_local))
    monkeypatch.setattr(probe, "probe_round", keeping_loss(probe.probe_round))
    monkeypatch.setattr(egress, "build", build_with_loss)


def _audit(fitted_bert: str, out: Path) -> dict:
    cfg = FedConfig(
        model=fitted_bert,
        finetune="full",
        labels=LABEL_NAMES,
        clients=1,
        min_clients=1,
        rounds=1,
        local_steps=20,
        lr=1e-6,
        max_length=8,
        secagg=False,
        federated_eval=True,
        epsilon=EPSILON,
        device="cpu",
        out=str(out),
    )
    examples = _clean_examples(50, seed=0)
    return audit.audit(cfg, examples, audit.default_canary(LABEL_NAMES), RUNS)


@pytest.mark.slow
def test_the_audit_flags_the_old_training_loss(fitted_bert, tmp_path, old_training_loss):
    result = _audit(fitted_bert, tmp_path)
    assert result["accounted"]["epsilon"] <= EPSILON
    assert result["resolution"] > EPSILON  # 8 + 8 test runs can prove more than the budget
    assert result["flagged"] == [LOSS_FIELD], result["flagged"]
    loss = next(f for f in result["fields"] if f["field"] == LOSS_FIELD)
    assert loss["kind"] == "dp-release" and loss["attack"] == "value"
    assert loss["epsilon_lower_bound"] > EPSILON
    assert loss["true_positives"] >= 7 and loss["false_positives"] <= 1


@pytest.mark.slow
def test_without_the_old_loss_no_field_of_the_site_is_flagged(fitted_bert, tmp_path):
    result = _audit(fitted_bert, tmp_path)
    assert result["flagged"] == [], result["flagged"]
    assert result["resolution"] > result["accounted"]["epsilon"] > 0
    names = {f["field"] for f in result["fields"]}
    # Every declared field of both replies was attacked, the update whole and array by array.
    for where, reply_type in (("train r1", egress.TRAINING), ("evaluate r1", egress.EVALUATION)):
        assert {f"{where} {f.record}[{f.key}]" for f in reply_type.fields} <= names
        assert f"{where} reply" in names
    assert "train r1 update[classifier.weight]" in names
    assert not any("train-loss" in name for name in names)
    assert json.loads(json.dumps(result)) == result  # JSON as it is printed


def test_the_command_line_writes_json_and_exits_by_the_verdict(monkeypatch, tmp_path, capsys):
    """``fedseal audit`` parses its options into the run it audits and returns 1 on a flag."""
    from fedseal.common.cli import main as cli_main

    seen = {}

    def fake_audit(cfg, examples, canary, runs, confidence):
        seen.update(cfg=cfg, examples=examples, canary=canary, runs=runs, confidence=confidence)
        return {
            "flagged": ["x"],
            "fields": [],
            "model": cfg.model,
            "finetune": cfg.finetune,
            "rounds": cfg.rounds,
            "site_examples": len(examples),
            "data": "synthetic",
            "runs_per_arm": runs,
            "test_runs_per_arm": runs - runs // 2,
            "accounted": {"epsilon": 0.5, "delta": 1e-5},
            "resolution": 1.0,
            "confidence": confidence,
            "max_bound": 2.0,
            "seconds": 1.0,
            "seconds_per_run": 0.1,
        }

    monkeypatch.setattr(audit, "audit", fake_audit)
    out = tmp_path / "result.json"
    code = cli_main(
        [
            "audit",
            "--runs",
            "6",
            "--site-examples",
            "50",
            "--canary-label",
            "positive",
            "--out",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    assert code == 1
    cfg = seen["cfg"]
    assert (cfg.epsilon, cfg.federated_eval, cfg.secagg, cfg.clients, cfg.dp) == (
        audit.DEFAULT_EPSILON,
        True,
        False,
        1,
        True,
    )
    assert (seen["runs"], len(seen["examples"]), seen["canary"].label) == (6, 50, "positive")
    assert seen["canary"].text.startswith(audit.CANARY_MARK)
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)


def test_the_run_report_shows_an_audit_flagged_fields_first_and_escaped(tmp_path, capsys):
    """``fedseal report RUN_DIR --audit FILE``: the verdict, the flagged field before larger
    bounds, every text escaped; a file that is not an audit result is refused."""
    from fedseal.common.cli import main as cli_main
    from fedseal.server.report import ReportError, load_audit

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"round": 1, "accuracy": 0.8, "epsilon": {"a": 0.5}, "private": True}) + "\n"
    )
    fields = [
        {
            "field": "train r2 update[*]",
            "kind": "dp-release",
            "attack": "projection",
            "epsilon_lower_bound": 0.05,
            "flagged": False,
        },
        {
            "field": "evaluate r1 metrics[<script>x</script>]",
            "kind": "public",
            "attack": "value",
            "epsilon_lower_bound": 0.0,
            "flagged": True,
        },
        {
            "field": "train r2 metrics[weight]",
            "kind": "public",
            "attack": "value",
            "epsilon_lower_bound": 0.2,
            "flagged": False,
        },
    ]
    result = tmp_path / "audit.json"
    result.write_text(
        json.dumps({"fields": fields, "accounted": {"epsilon": 0.5}, "resolution": 1.5, "runs_per_arm": 40})
    )
    assert cli_main(["report", str(run), "--audit", str(result)]) == 0
    page = Path(capsys.readouterr().out.strip()).read_text()
    section = page[page.index("<h2>Privacy audit</h2>") :]
    assert "&lt;script&gt;x&lt;/script&gt;" in section and "<script>" not in page
    assert "1 field(s) reveal more than the accounted ε" in section
    order = [section.index(name) for name in ("&lt;script&gt;", "metrics[weight]", "update[*]")]
    assert order == sorted(order)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fields": [{"field": "x"}], "accounted": {}}))
    with pytest.raises(ReportError, match="no numeric epsilon_lower_bound"):
        load_audit(bad)
