"""The ClientApp with a site's ledger and policy: spend recorded once, never the same update
twice, refusals with reasons (named in the server's metrics), resume.

Real ClientApp and ServerApp over the in-process grid, tiny BERT, site node
configs as a deployed agent sets them (data path, ledger path and key, budget, policy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedseal.client import ledger as ledger_module
from fedseal.client import ledger_cli
from fedseal.client.evaluation import EVALUATED_SUFFIX
from fedseal.client.ledger import LedgerError, PrivacyLedger
from fedseal.client.pending import pending_path
from fedseal.client.reply import train_reply
from fedseal.client.site import site_settings
from fedseal.client.spend import PROGRESS, CommittedRound, commit_round
from fedseal.common import egress, synthetic
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples, write_examples
from fedseal.common.egress import train_reply_type
from fedseal.common.model import build_model, trainable_state
from fedseal.common.records import (
    JOB_KEY,
    ROUND_KEY,
    config_to_record,
    record_to_state,
    state_to_record,
    to_numpy_state,
)
from fedseal.common.refusals import describe
from fedseal.common.secagg_wire import pack_ids
from fedseal.server.app import run_federation
from fedseal.server.checkpoint import CheckpointError
from fedseal.server.identity import SiteNames
from simulations.bench.local_grid import RUN_ID, LocalGrid

LABELS = ("negative", "positive")


@pytest.fixture
def site(tmp_path, tiny_bert):
    data = write_examples(synthetic.synthetic_examples(64, seed=1), tmp_path / "site.jsonl")
    write_examples(synthetic.synthetic_examples(32, seed=2), tmp_path / "eval.jsonl")
    cfg = FedConfig(
        model=tiny_bert,
        finetune="full",
        labels=LABELS,
        clients=1,
        min_clients=1,
        rounds=2,
        local_steps=2,
        batch_size=16,
        max_length=16,
        secagg=False,
        eval=str(tmp_path / "eval.jsonl"),
        out=str(tmp_path / "out"),
    )
    (tmp_path / "secrets").mkdir()
    node = {
        "data-path": str(data),
        "site-name": "alpha",
        "epsilon": 8.0,
        "delta": 1e-5,
        "ledger-path": str(tmp_path / "ledger.json"),
        "device": "cpu",
        "ledger-key": str(tmp_path / "secrets" / "ledger.key"),
        "require-secagg": False,  # this site allows plain rounds; its policy says so
        "allow-model": tiny_bert,
        "labels": ",".join(LABELS),
    }
    return cfg, node, tmp_path


def _ledger_at(path, key) -> PrivacyLedger:
    return PrivacyLedger.load(Path(path), Path(key))


def _ledger(tmp) -> PrivacyLedger:
    return PrivacyLedger.open(
        tmp / "ledger.json", "alpha", 8.0, 1e-5, key_path=tmp / "secrets" / "ledger.key"
    )


def _train(
    grid: LocalGrid,
    cfg: FedConfig,
    server_round: int,
    job: str = "job-1",
    weights=None,
    secagg: dict | None = None,
) -> Message:
    if weights is None:
        weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    content = RecordDict(
        {
            "global": state_to_record(weights),
            "config": config_to_record(cfg, **{ROUND_KEY: server_round, JOB_KEY: job}),
        }
    )
    if secagg is not None:
        content["secagg"] = ConfigRecord(secagg)
    msg = Message(content, dst_node_id=grid.nodes[0], message_type="train")
    [reply] = grid.send_and_receive([msg])
    return reply


def _refusal(reply: Message) -> str:
    """The refusal in the server's own words (its code first), or "" for an answer."""
    assert not reply.has_error(), reply.error.reason
    refused = egress.refusal_of(reply)
    return describe(*refused) if refused else ""


@pytest.mark.parametrize("bad", ["abc", -1, True, 1.5])
def test_a_round_number_no_honest_server_sends_is_refused(site, bad):
    """A hostile server's round field: a refusal naming the setting, no crash, nothing recorded."""
    cfg, node, tmp = site
    reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, bad))
    assert reason.startswith("message.round: ") and "setting server-round" in reason
    assert not (tmp / "ledger.json").exists()


def test_spend_is_recorded_and_a_repeated_plain_round_is_trained_afresh(site):
    cfg, node, tmp = site
    grid = LocalGrid(1, node_configs=[node])
    first = _train(grid, cfg, 1)
    assert _refusal(first) == ""
    [entry] = _ledger(tmp).entries
    assert (entry.run, entry.round, entry.steps) == ("job-1", 1, 2)
    assert entry.epsilon == pytest.approx(float(first.content["metrics"]["epsilon"]))
    assert float(first.content["metrics"]["delta"]) == pytest.approx(1e-5)  # the site's total
    assert not pending_path(tmp / "ledger.json").exists()  # a plain update left at once

    # The server crashed before completing round 1 and asks again, same weights: the
    # update already left, so it is never sent again; the site trains afresh, and the
    # extra spend is recorded (a fresh agent: empty Context.state).
    again = _train(LocalGrid(1, node_configs=[node]), cfg, 1)
    assert _refusal(again) == ""
    one = record_to_state(first.content["update"])
    two = record_to_state(again.content["update"])
    assert not all(np.array_equal(one[k], two[k]) for k in one)
    assert [(e.round, e.steps) for e in _ledger(tmp).entries] == [(1, 2), (1, 4)]

    # Round 2 continues from the ledger's steps; it would exceed the plan: refused,
    # saying that the round was trained before and is never sent again.
    reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 2))
    assert reason.startswith("budget.round: ")
    reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 1))
    assert reason.startswith("round.sent: ") and "round 1" in reason


@pytest.mark.parametrize(
    "broken, error, said",
    [
        ("record", LedgerError("the ledger's folder is read-only"), "folder is read-only"),
        ("atomic_write", OSError(28, "No space left on device"), "No space left on device"),
    ],
)
def test_a_round_whose_spend_cannot_be_recorded_sends_nothing(site, monkeypatch, caplog, broken, error, said):
    """The ledger cannot take the round (a refusal of its own, or the disk write failing):
    the reply carries no update, no keys, no metrics, and the ledger is as it was."""
    cfg, node, tmp = site
    grid = LocalGrid(1, node_configs=[node])
    assert _refusal(_train(grid, cfg, 1)) == ""
    before = (tmp / "ledger.json").read_bytes()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(PrivacyLedger if broken == "record" else ledger_module, broken, fail)
    with caplog.at_level(logging.WARNING):
        reply = _train(grid, cfg, 2)
    assert reply.has_content() and not (set(reply.content) - {"status", "refusal"})  # no crash
    assert _refusal(reply).startswith("site.ledger: ") and said not in _refusal(reply)
    assert said in caplog.text  # the explanation stays in the site's own log
    assert (tmp / "ledger.json").read_bytes() == before
    monkeypatch.undo()  # the disk is back: the round trains and is recorded
    assert _refusal(_train(grid, cfg, 2)) == "" and len(_ledger(tmp).entries) == 2


def test_the_ledger_alone_counts_the_steps_where_there_is_one(site):
    """Steps live in one place: the ledger when the site has one, else the run's state."""
    cfg, node, _ = site
    for config, kept in (
        (node, False),
        ({k: v for k, v in node.items() if not k.startswith("ledger-")}, True),
    ):
        grid = LocalGrid(1, node_configs=[config])
        for server_round, steps in ((1, 2), (2, 4)):
            reply = _train(grid, cfg, server_round)
            assert _refusal(reply) == "" and reply.content["metrics"]["steps"] == steps
            assert (PROGRESS in grid.contexts[grid.nodes[0]].state) is kept


def test_a_reply_is_built_only_from_the_round_committed_for_its_update(site):
    cfg, node, _ = site
    settings = site_settings(node, cfg)
    context = Context(run_id=RUN_ID, node_id=1, node_config=node, state=RecordDict(), run_config={})
    update = {"w": np.ones((2, 2), np.float32)}
    committed = commit_round("alpha", None, context, "job-1", 1, 2, 1.5, 1e-5, update, 1.0)
    with pytest.raises(TypeError, match="made only by fedseal.client.spend.commit_round"):
        CommittedRound(**{**dataclasses.asdict(committed), "_token": object()})

    def message(server_round: int, job: str = "job-1") -> Message:
        return Message(
            RecordDict({"config": config_to_record(cfg, **{ROUND_KEY: server_round, JOB_KEY: job})}),
            dst_node_id=1,
            message_type="train",
        )

    reply = train_reply(message(1), context, cfg, settings, committed, update)
    assert np.array_equal(record_to_state(reply.content["update"])["w"], update["w"])
    with pytest.raises(ValueError, match="not the one whose spend was committed"):
        train_reply(message(1), context, cfg, settings, committed, {"w": 2 * update["w"]})
    for other in (message(2), message(1, job="job-2")):
        with pytest.raises(ValueError, match="the committed round is round 1 of job job-1"):
            train_reply(other, context, cfg, settings, committed, update)


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_a_run_whose_timeout_leaves_no_room_for_the_sites_reply_hold_is_refused_unread_and_unheld(
    site, message_type, monkeypatch
):
    """Held for 30 s, the site's replies would likely reach a server that waits 30 s too late:
    the site refuses before it reads its data, its model, its ledger or its once-per-round
    record (each of them here fails the test if touched), and that refusal is not held, so
    the server's operator reads what to raise."""
    from fedseal.client import cache, evaluation, once, training

    def untouched(*args, **kwargs):
        raise AssertionError("read before the run's timeout was checked")

    for module, name in [
        (training, "examples_of"),
        (training, "open_ledger"),
        (training, "global_model"),
        (evaluation, "examples_of"),
        (evaluation, "open_ledger"),
        (cache, "model_and_tokenizer"),
        (once, "done"),
    ]:
        monkeypatch.setattr(module, name, untouched)
    cfg, node, tmp = site
    cfg = dataclasses.replace(cfg, timeout=30.0, federated_eval=True)
    grid = LocalGrid(1, node_configs=[{**node, "reply-hold": 30.0, "federated-eval": "on"}])
    content = RecordDict(
        {"config": config_to_record(cfg, **{ROUND_KEY: 1, JOB_KEY: "job-1"})},
    )
    began = time.monotonic()
    [answer] = grid.send_and_receive([Message(content, dst_node_id=grid.nodes[0], message_type=message_type)])
    assert time.monotonic() - began < 15.0
    assert egress.refusal_of(answer) == (
        "policy.timeout",
        {"setting": "timeout", "asked": "30.0", "limit": "60.0"},
    )
    assert not (tmp / "ledger.json").exists()


def test_a_third_round_beyond_the_plan_is_refused(site):
    cfg, node, _ = site
    grid = LocalGrid(1, node_configs=[node])
    for r in (1, 2):
        assert _refusal(_train(grid, cfg, r)) == ""
    assert _refusal(_train(grid, cfg, 3)).startswith("budget.round: ")


def test_jobs_share_the_sites_total_and_are_refused_once_the_next_would_pass_it(site, caplog):
    """Real ClientApp, real accounting: a site whose total is epsilon 1, delta 1e-5 and a server
    starting one-round jobs that each ask for epsilon 0.3 and the whole delta. Three are granted
    0.3 and 3e-6 each; the fourth is refused (budget.exhausted, with what is left), the site's
    log saying what to do; a job asking for the 0.1 left takes the rest of both; after a raise of
    epsilon alone the next is refused for delta. Delta spent stays within the total."""
    from fedseal.common.privacy import epsilon_spent

    cfg, node, tmp = site
    cfg, node = cfg.replace(rounds=1, epsilon=0.3), {**node, "epsilon": 1.0}

    def ledger(total: float = 1.0) -> PrivacyLedger:
        return PrivacyLedger.open(
            tmp / "ledger.json", "alpha", total, 1e-5, key_path=tmp / "secrets" / "ledger.key"
        )

    for job in ("job-1", "job-2", "job-3"):
        reply = _train(LocalGrid(1, node_configs=[node]), cfg, 1, job=job)
        assert _refusal(reply) == ""
        granted, [entry] = ledger().grant_of(job), [e for e in ledger().entries if e.run == job]
        assert (granted.epsilon, granted.delta) == (0.3, pytest.approx(3e-6))
        assert entry.delta == granted.delta and 0 < entry.epsilon <= 0.3
        assert entry.epsilon == pytest.approx(
            epsilon_spent(entry.noise_multiplier, entry.sample_rate, entry.steps, granted.delta)
        )
    with caplog.at_level(logging.WARNING):
        reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 1, job="job-4"))
    assert reason.startswith("budget.exhausted: ") and "asked 0.3, remaining 0.1" in reason
    assert "fedseal ledger raise --ledger" in caplog.text and "job-4" not in reason
    assert ledger().grant_of("job-4") is None
    assert _refusal(_train(LocalGrid(1, node_configs=[node]), cfg.replace(epsilon=0.1), 1, job="job-5")) == ""
    assert ledger().remaining().epsilon == pytest.approx(0.0, abs=1e-12)
    assert 0 <= ledger().remaining().delta <= 1e-20
    assert ledger().delta_spent() <= 1e-5 and ledger().epsilon_spent() <= 1.0
    assert (
        ledger_cli.main(
            [
                "raise",
                "--ledger",
                str(tmp / "ledger.json"),
                "--ledger-key",
                str(tmp / "secrets" / "ledger.key"),
                "--epsilon",
                "2",
                "--by",
                "dana",
                "--reason",
                "more epsilon",
            ]
        )
        == 0
    )
    reason = _refusal(
        _train(
            LocalGrid(1, node_configs=[{**node, "epsilon": 2.0}]), cfg.replace(epsilon=0.1), 1, job="job-6"
        )
    )
    assert reason.startswith("budget.exhausted: ") and ledger(2.0).grant_of("job-6") is None


def test_a_run_asking_more_than_the_sites_max_run_epsilon_is_refused(site):
    cfg, node, tmp = site
    reason = _refusal(_train(LocalGrid(1, node_configs=[{**node, "max-run-epsilon": 2.0}]), cfg, 1))
    assert reason.startswith("policy.run_epsilon: ")
    assert "setting epsilon, asked 8.0, limit 2.0" in reason
    assert _ledger(tmp).grants == () and _ledger(tmp).entries == ()


def test_a_raise_mid_job_leaves_the_jobs_grant_and_calibration(site, caplog):
    """A job granted epsilon 4 of the site's 8 goes on after the total is raised to 16 with the
    grant, noise and delta it started with: the grant is never recomputed."""
    cfg, node, tmp = site
    cfg = cfg.replace(epsilon=4.0)
    assert _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 1)) == ""
    assert (
        ledger_cli.main(
            [
                "raise",
                "--ledger",
                str(tmp / "ledger.json"),
                "--ledger-key",
                str(tmp / "secrets" / "ledger.key"),
                "--epsilon",
                "16",
                "--by",
                "dana",
                "--reason",
                "second study",
            ]
        )
        == 0
    )
    raised = {**node, "epsilon": 16.0}
    # the agent must be restarted with the new total; until then the site refuses
    with caplog.at_level(logging.WARNING):
        reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 2))
    assert reason.startswith("site.ledger: ") and "Start it with --epsilon 16" in caplog.text
    assert _refusal(_train(LocalGrid(1, node_configs=[raised]), cfg, 2)) == ""
    led = PrivacyLedger.open(
        tmp / "ledger.json", "alpha", 16.0, 1e-5, key_path=tmp / "secrets" / "ledger.key"
    )
    [first, second] = led.entries
    assert (led.grant_of("job-1").epsilon, led.grant_of("job-1").delta) == (4.0, 5e-6)
    assert (first.noise_multiplier, first.delta) == (second.noise_multiplier, 5e-6)
    assert 3.9 < second.epsilon <= 4.0  # the two rounds spend the grant, not the raised total


def test_tampered_ledger_is_refused_not_reset(site):
    cfg, node, tmp = site
    grid = LocalGrid(1, node_configs=[node])
    assert _refusal(_train(grid, cfg, 1)) == ""
    path = tmp / "ledger.json"
    body = json.loads(path.read_text())
    body["entries"][0]["epsilon"] = 0.01  # someone "gives back" budget by hand
    path.write_text(json.dumps(body))
    before = path.read_bytes()
    assert _refusal(_train(grid, cfg, 2)).startswith("site.ledger: ")
    assert path.read_bytes() == before


def test_changed_plan_mid_run_is_refused(site):
    cfg, node, _ = site
    grid = LocalGrid(1, node_configs=[node])
    assert _refusal(_train(grid, cfg, 1)) == ""
    assert _refusal(_train(grid, cfg.replace(rounds=5), 2)).startswith("plan.changed: ")


def test_unknown_label_and_foreign_model_are_refused_with_reasons(site, tmp_path):
    cfg, node, tmp = site
    odd = Examples(["a fine film"] * 20, [0] * 20, ("meh",), "odd")
    node_bad = {
        **node,
        "data-path": str(write_examples(odd, tmp / "odd.jsonl")),
        "ledger-path": str(tmp / "other-ledger.json"),
        "ledger-key": str(tmp / "secrets" / "other.key"),
    }
    reason = _refusal(_train(LocalGrid(1, node_configs=[node_bad]), cfg, 1))
    assert reason.startswith("site.data: ") and "meh" not in reason
    wrong = {k: np.zeros((3, 3), np.float32) for k in ("not.a.parameter",)}
    reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 1, weights=wrong))
    assert reason.startswith("message.weights: ")


class CrashingGrid(LocalGrid):
    """Raises, as a killed server would stop, when the ``crash_at``-th round starts."""

    def __init__(self, *args, crash_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at, self.rounds = crash_at, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.rounds += 1
            if self.rounds == self.crash_at:
                raise RuntimeError("server killed")
        return super().send_and_receive(messages, timeout=timeout)


def test_server_resumes_after_the_last_checkpointed_round(site):
    from fedseal.server.checkpoint import load_checkpoint

    cfg, node, tmp = site
    cfg = cfg.replace(strategy="fedadam")
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(CrashingGrid(1, node_configs=[node], crash_at=2), cfg, RUN_ID, resume=True)
    out = tmp / "out"
    ckpt = load_checkpoint(out / "checkpoint")
    assert ckpt.round == 1 and any(k.startswith("m/") for k in ckpt.strategy_state)
    assert [r["phase"] for r in ckpt.metrics] == ["all weights"]
    # A checkpoint written before rows recorded their phase still resumes.
    from fedseal.server.checkpoint import save_checkpoint

    unrecorded = [{k: v for k, v in r.items() if k != "phase"} for r in ckpt.metrics]
    save_checkpoint(out / "checkpoint", 1, ckpt.weights, ckpt.strategy_state, unrecorded, ckpt.config)
    # Under DP the planned rounds cannot change on resume: sites calibrated for them.
    with pytest.raises(CheckpointError, match="rounds"):
        run_federation(LocalGrid(1, node_configs=[node]), cfg.replace(rounds=3), RUN_ID, resume=True)

    summary = run_federation(LocalGrid(1, node_configs=[node]), cfg, RUN_ID, resume=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and [r["round"] for r in rows] == [1, 2]
    # Each site's delta beside its epsilon: the site's total over every job it trained in.
    assert all(set(r["delta"]) == set(r["epsilon"]) == {"alpha"} for r in rows)
    assert all(r["delta"]["alpha"] == pytest.approx(1e-5) for r in rows)
    job = json.loads((out / "checkpoint" / "job.json").read_text())["job_id"]
    entries = _ledger(tmp).entries
    assert [(e.run, e.round) for e in entries] == [(job, 1), (job, 2)]
    # A finished run restarted again trains nothing, and saves the trained model (not the
    # initial one it builds before reading the checkpoint).
    (out / "model").rename(tmp / "model-first")
    run_federation(LocalGrid(1, node_configs=[node]), cfg, RUN_ID, resume=True)
    assert len(_ledger(tmp).entries) == 2
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out / "model", trust_remote_code=True)
    head = load_checkpoint(out / "checkpoint").weights["classifier.weight"]
    assert np.abs(head).max() > 0
    assert np.allclose(saved.classifier.weight.detach().numpy(), head, atol=1e-6)


@pytest.mark.parametrize(
    "run, policy, named",
    [
        ({"dp": False}, {}, ("policy.dp: ", "setting dp, asked False, limit True")),
        ({"secagg": False}, {}, ("policy.secagg: ", "setting secagg, asked False, limit True")),
        ({"clients": 2, "min_clients": 2}, {}, ("policy.cohort: ", "setting clients, asked 2, limit 3")),
        ({"clients": 4, "min_clients": 2}, {}, ("policy.cohort: ", "setting min-clients, asked 2")),
        ({"secagg_k": 2}, {"min-secagg-k": 3}, ("policy.secagg_k: ", "setting secagg-k, asked 2, limit 3")),
        (
            {"secagg_threshold": 2},
            {"min-secagg-threshold": 3},
            ("policy.secagg_threshold: ", "setting secagg-threshold, asked 2, limit 3"),
        ),
        ({"update_clip": 100.0}, {}, ("policy.update_clip: ", "asked 100.0, limit 64.0")),
        ({"clients": 4, "min_clients": 3}, {"_cohort": 2}, ("policy.cohort: ", "setting cohort, asked 2")),
        (
            {"clients": 4, "min_clients": 3},
            {"_k": 1, "min-secagg-k": 2},
            ("policy.secagg_k: ", "asked 1, limit 2"),
        ),
        (
            {"clients": 4, "min_clients": 3},
            {"_t": 2, "min-secagg-threshold": 3},
            ("policy.secagg_threshold: ", "asked 2, limit 3"),
        ),
        # k = 2, t = 2: the server and one colluding site can unmask a site (2t-k-1 = 1).
        ({"clients": 4, "min_clients": 3}, {"_t": 2}, ("policy.colluders: ", "asked 2, limit 1")),
        (
            {"clients": 4, "min_clients": 4},
            {"_cohort": 4, "_k": 3, "_t": 3, "min-cohort": 4, "max-colluders": 2},
            ("policy.colluders: ", "limit 2"),
        ),
        # k = 2, t = 3 passes 2t-k-1 = 3 > 2, but two colluding neighbours know their pairwise
        # masks with the site and, with its own share, hold t = 3 shares of its self-mask.
        (
            {"clients": 6, "min_clients": 4},
            {"_cohort": 6, "_k": 2, "_t": 3, "min-cohort": 4, "max-colluders": 2},
            ("policy.colluders: ", "asked 3, limit 2"),
        ),
    ],
)
def test_a_run_asking_for_less_than_the_site_policy_is_refused_before_anything(site, run, policy, named):
    cfg, node, tmp = site
    cfg = cfg.replace(**{"secagg": True, "clients": 3, "min_clients": 3, **run})
    node = {k: v for k, v in node.items() if k != "require-secagg"}  # the safe defaults
    node.update({k: v for k, v in policy.items() if not k.startswith("_")})
    grid = LocalGrid(1, node_configs=[node])
    n = policy.get("_cohort", 3)
    params = {
        "nodes": pack_ids([grid.nodes[0] + i for i in range(n)]),
        "round": 1,
        "k": policy.get("_k", 2),
        "threshold": policy.get("_t", 3),
    }
    reason = _refusal(_train(grid, cfg, 1, secagg=params))
    assert reason.startswith(named[0]) and named[1] in reason, reason
    assert not (tmp / "ledger.json").exists()  # refused before the ledger, the model, the data


@pytest.mark.parametrize(
    "run, policy, named",
    [
        ({"min_clients": 2}, {}, ("policy.cohort: ", "setting min-clients, asked 2, limit 3")),
        ({"dp": False}, {}, ("policy.dp: ", "setting dp")),
        ({"secagg": False}, {}, ("policy.secagg: ", "setting secagg")),
        ({"secagg_k": 2}, {"min-secagg-k": 3}, ("policy.secagg_k: ", "asked 2, limit 3")),
        (
            {"secagg_threshold": 2},
            {"min-secagg-threshold": 3},
            ("policy.secagg_threshold: ", "asked 2, limit 3"),
        ),
    ],
)
def test_refusals_are_named_in_the_server_metrics(site, run, policy, named):
    """The real ServerApp over three sites with the safe default policy (a cohort of 3):
    a run asking for less is refused by each, and metrics.jsonl names the setting."""
    cfg, node, tmp = site
    cfg = cfg.replace(**{"secagg": True, "clients": 3, "min_clients": 3, "rounds": 1, **run})
    nodes = [
        {**{k: v for k, v in node.items() if k != "require-secagg"}, **policy, "site-name": name}
        for name in ("alpha", "beta", "gamma")
    ]
    run_federation(LocalGrid(3, node_configs=nodes), cfg, RUN_ID)
    [row] = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["refused"]) == ["alpha", "beta", "gamma"] and not row["contributors"]
    assert all(why.startswith(named[0]) and named[1] in why for why in row["refused"].values()), row[
        "refused"
    ]
    assert not (tmp / "ledger.json").exists()


def test_federated_evaluation_is_off_unless_the_site_turns_it_on(site, caplog):
    from fedseal.server.app import federated_evaluate

    def refused_because(grid: LocalGrid, why: str) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            empty = federated_evaluate(grid, grid.nodes, weights, cfg, "job-1", 1, SiteNames()) == {}
        return empty and why in caplog.text

    cfg, node, _ = site
    cfg = cfg.replace(federated_eval=True)  # the run plans it: a step of each site's budget
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    off = LocalGrid(1, node_configs=[node])
    assert _refusal(_train(off, cfg, 1, weights=weights)) == ""
    assert refused_because(off, "policy.federated_eval")  # off by default
    on = LocalGrid(
        1,
        node_configs=[
            {
                **node,
                "federated-eval": "on",
                "ledger-path": str(node["ledger-path"]) + ".on",
                "ledger-key": str(node["ledger-key"]) + ".on",
            }
        ],
    )
    assert refused_because(on, "round.not_trained")
    assert _refusal(_train(on, cfg, 1, weights=weights)) == ""
    steps = _ledger_at(node["ledger-path"] + ".on", node["ledger-key"] + ".on").steps_done("job-1")
    scores = federated_evaluate(on, on.nodes, weights, cfg, "job-1", 1, SiteNames())
    assert set(scores) == {"accuracy", "loss"}  # noisy: a clamped 0 loss is a fair answer
    # The answer is one more step of the site's DP mechanism, recorded before it left.
    after = _ledger_at(node["ledger-path"] + ".on", node["ledger-key"] + ".on")
    assert after.steps_done("job-1") == steps + 1
    assert refused_because(on, "round.evaluated")  # once per round
    # a restarted site (fresh Context) that trains the round again still answers only once:
    # the record is on disk beside the ledger
    restarted = LocalGrid(1, node_configs=[on.contexts[on.nodes[0]].node_config])
    assert _refusal(_train(restarted, cfg, 1, weights=weights)) == ""
    assert refused_because(restarted, "round.evaluated")
    record = Path(str(node["ledger-path"]) + ".on" + EVALUATED_SUFFIX)
    assert json.loads(record.read_text())["rounds"] == [["job-1", 1]]
    # A run that did not plan evaluation cannot spend a site's budget on it, site on or not.
    cfg = cfg.replace(federated_eval=False)
    assert refused_because(on, "policy.federated_eval: ")


def test_federated_evaluation_is_a_noisy_release_of_the_sampled_scores():
    """With a plan, accuracy and loss come from one sampled Gaussian step: noisy, in range;
    without one (a non-private run), exact."""
    import torch

    from fedseal.client.evaluation import LOSS_CLIP, release_scores
    from fedseal.common.privacy import DPPlan

    correct = torch.tensor([1.0] * 700 + [0.0] * 300)
    loss = torch.tensor([0.1] * 700 + [9.0] * 300)
    exact = release_scores(correct, loss, None)
    assert exact["accuracy"] == pytest.approx(0.7)
    assert exact["loss"] == pytest.approx((700 * 0.1 + 300 * LOSS_CLIP) / 1000)
    plan = DPPlan(
        noise_multiplier=2.0,
        sample_rate=0.5,
        planned_steps=10,
        target_epsilon=1.0,
        delta=1e-5,
        accountant="rdp",
    )
    noisy = [release_scores(correct, loss, plan) for _ in range(200)]
    accuracies = np.array([r["accuracy"] for r in noisy])
    assert len(set(accuracies)) > 150  # fresh noise every time
    assert abs(accuracies.mean() - 0.7) < 0.01 and 0.005 < accuracies.std() < 0.05
    assert all(0 <= r["loss"] <= LOSS_CLIP and 0 <= r["accuracy"] <= 1 for r in noisy)


@pytest.mark.parametrize("claimed", [1e9, 0.0, -1.0, float("nan"), float("inf")])
def test_a_plain_reply_claiming_a_weight_no_honest_site_sends_is_dropped(site, claimed):
    """Without secure aggregation the server sees each weight; a site claiming 1e9 would
    make the mean its own update. It is dropped and named, like any malformed reply."""
    from fedseal.common.weights import weight_range
    from fedseal.server.aggregate import RoundSums, sum_plain

    cfg, node, tmp = site
    grid = LocalGrid(1, node_configs=[node])
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    reply = _train(grid, cfg, 1, weights=weights)
    assert _refusal(reply) == ""
    honest = sum_plain(
        [reply],
        weights,
        RoundSums(),
        train_reply_type(cfg, 1),
        SiteNames(),
        weight_range(cfg, 1),
        cfg.update_clip,
    )
    assert honest.contributors == ["alpha"] and honest.weight_sum == 1.0
    reply.content["metrics"]["weight"] = claimed
    sums = sum_plain(
        [reply],
        weights,
        RoundSums(),
        train_reply_type(cfg, 1),
        SiteNames(),
        weight_range(cfg, 1),
        cfg.update_clip,
    )
    assert sums.contributors == [] and sums.update_sum is None and sums.weight_sum == 0.0
    why = sums.failed["alpha"]
    assert why.startswith("reply.range" if np.isfinite(claimed) else "reply.nonfinite"), why


def test_a_vote_round_sends_bounded_votes_and_a_forged_vote_moves_the_mean_by_its_share(site):
    """A real ClientApp in a vote round sends votes in [-1, 1] and its scale entry; a
    site that forges votes of 1e9 (plain rounds show the server each update) is
    clipped to the round's bound of 1, so beside one honest site it moves each
    coordinate of the mean vote by at most 1, not 1e9; one that leaves out its
    scale entry is dropped and named."""
    import numpy as np

    from fedseal.common.records import record_to_state
    from fedseal.common.vote import SCALE_KEY, from_votes, round_clip, update_template
    from fedseal.common.weights import weight_range
    from fedseal.server.aggregate import RoundSums, sum_plain

    cfg, node, tmp = site
    cfg = cfg.replace(aggregation="vote")
    grid = LocalGrid(1, node_configs=[node])
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    template = update_template(weights, cfg, 1)
    reply = _train(grid, cfg, 1, weights=weights)
    assert _refusal(reply) == ""
    votes = record_to_state(reply.content["update"], template)
    assert list(votes)[-1] == SCALE_KEY and round_clip(cfg, 1) == 1.0
    assert 0.0 < max(float(np.abs(v).max()) for v in votes.values()) <= 1.0

    def other(name):  # another site on the same data, with its own ledger
        return LocalGrid(
            1,
            node_configs=[
                {
                    **node,
                    "site-name": name,
                    "ledger-path": str(tmp / f"{name}.json"),
                    "ledger-key": str(tmp / "secrets" / f"{name}.key"),
                }
            ],
        )

    forged = _train(other("beta"), cfg, 1, weights=weights)
    forged.metadata.__dict__["_src_node_id"] = grid.nodes[0] + 1  # another node than alpha's
    forged.content["update"] = state_to_record({k: np.full_like(v, 1e9) for k, v in votes.items()})
    sums = sum_plain(
        [reply, forged],
        template,
        RoundSums(),
        train_reply_type(cfg, 1),
        SiteNames(),
        weight_range(cfg, 1),
        round_clip(cfg, 1),
    )
    assert sorted(sums.contributors) == ["alpha", "beta"], (sums.failed, sums.refused)
    mean = sums.mean_update()
    honest = {k: np.asarray(v, dtype=np.float64) for k, v in votes.items()}
    assert all(np.allclose(mean[k], (honest[k] + 1.0) / 2) for k in mean)
    step, scale = from_votes(mean, cfg.update_clip)
    assert scale <= cfg.update_clip and max(float(np.abs(v).max()) for v in step.values()) <= scale

    short = _train(other("gamma"), cfg, 1, weights=weights)
    short.metadata.__dict__["_src_node_id"] = grid.nodes[0] + 2
    short.content["update"] = state_to_record({k: v for k, v in votes.items() if k != SCALE_KEY})
    sums = sum_plain(
        [short],
        template,
        RoundSums(),
        train_reply_type(cfg, 1),
        SiteNames(),
        weight_range(cfg, 1),
        round_clip(cfg, 1),
    )
    assert sums.contributors == [] and SCALE_KEY in sums.failed["gamma"]


def test_a_plain_reply_gets_no_more_say_than_its_weight(site):
    """With bucket weights a site's entries are its weight times a bounded update: one
    claiming the smallest weight (1/16) but sending entries of 1e9 is clipped to 1/16,
    not to the round's bound of 1."""
    import numpy as np

    from fedseal.common.vote import round_clip, update_template
    from fedseal.common.weights import SMALLEST_BUCKET, weight_range
    from fedseal.server.aggregate import RoundSums, sum_plain

    cfg, node, tmp = site
    cfg = cfg.replace(aggregation="vote", weighting="bucket")
    grid = LocalGrid(1, node_configs=[node])
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    template = update_template(weights, cfg, 1)
    reply = _train(grid, cfg, 1, weights=weights)
    assert _refusal(reply) == "" and reply.content["metrics"]["weight"] == SMALLEST_BUCKET
    reply.content["update"] = state_to_record({k: np.full_like(v, 1e9) for k, v in template.items()})
    sums = sum_plain(
        [reply],
        template,
        RoundSums(),
        train_reply_type(cfg, 1),
        SiteNames(),
        weight_range(cfg, 1),
        round_clip(cfg, 1),
    )
    assert sums.contributors == ["alpha"]
    assert all(np.all(v == SMALLEST_BUCKET) for v in sums.update_sum.values())
