"""The ClientApp with a site's ledger: spend recorded once, refusals with reasons, resume.

Real ClientApp and ServerApp over the in-process grid, tiny BERT, site node
configs as a deployed agent sets them (data path, ledger path, budget).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from client.ledger import PrivacyLedger
from client.resend import resend_path
from common import synthetic
from common.config import FedConfig
from common.data import Examples, write_examples
from common.model import build_model, trainable_state
from common.records import (JOB_KEY, ROUND_KEY, config_to_record, record_to_state,
                            state_to_record, to_numpy_state)
from server.app import run_federation
from server.checkpoint import CheckpointError
from simulations.local_grid import RUN_ID, LocalGrid

LABELS = ("negative", "positive")


@pytest.fixture
def site(tmp_path, tiny_bert):
    data = write_examples(synthetic.synthetic_examples(64, seed=1), tmp_path / "site.jsonl")
    write_examples(synthetic.synthetic_examples(32, seed=2), tmp_path / "eval.jsonl")
    cfg = FedConfig(model=tiny_bert, finetune="full", labels=LABELS, clients=1, min_clients=1,
                    rounds=2, local_steps=2, batch_size=16, max_length=16, secagg=False,
                    eval=str(tmp_path / "eval.jsonl"), out=str(tmp_path / "out"))
    node = {"data-path": str(data), "site-name": "alpha", "epsilon": 8.0, "delta": 1e-5,
            "ledger-path": str(tmp_path / "ledger.json"), "device": "cpu"}
    return cfg, node, tmp_path


def _train(grid: LocalGrid, cfg: FedConfig, server_round: int, job: str = "job-1",
           weights=None) -> Message:
    if weights is None:
        weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    content = RecordDict({"global": state_to_record(weights),
                          "config": config_to_record(cfg, **{ROUND_KEY: server_round, JOB_KEY: job})})
    msg = Message(content, dst_node_id=grid.nodes[0], message_type="train")
    [reply] = grid.send_and_receive([msg])
    return reply


def _refusal(reply: Message) -> str:
    assert not reply.has_error(), reply.error.reason
    return str(reply.content["status"].get("refused", ""))


def test_spend_is_recorded_and_a_repeated_round_is_resent_not_retrained(site):
    cfg, node, tmp = site
    grid = LocalGrid(1, node_configs=[node])
    first = _train(grid, cfg, 1)
    assert _refusal(first) == ""
    ledger = PrivacyLedger.open(tmp / "ledger.json", "alpha", 8.0, 1e-5)
    [entry] = ledger.entries
    assert (entry.run, entry.round, entry.steps) == ("job-1", 1, 2)
    assert entry.epsilon == pytest.approx(float(first.content["metrics"]["epsilon"]))
    assert resend_path(tmp / "ledger.json").exists()

    # The server crashed before completing round 1 and asks again, same weights:
    # same update, nothing new in the ledger (a fresh agent: empty Context.state).
    again = _train(LocalGrid(1, node_configs=[node]), cfg, 1)
    assert _refusal(again) == ""
    one = record_to_state(first.content["update"])
    two = record_to_state(again.content["update"])
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert len(PrivacyLedger.open(tmp / "ledger.json", "alpha", 8.0, 1e-5).entries) == 1

    # Round 2 continues from the ledger's steps, not from zero.
    second = _train(LocalGrid(1, node_configs=[node]), cfg, 2)
    assert int(second.content["metrics"]["steps"]) == 4
    eps = [e.epsilon for e in PrivacyLedger.open(tmp / "ledger.json", "alpha", 8.0, 1e-5).entries]
    assert eps[0] < eps[1] <= 8.0


def test_a_third_round_beyond_the_plan_is_refused(site):
    cfg, node, _ = site
    grid = LocalGrid(1, node_configs=[node])
    for r in (1, 2):
        assert _refusal(_train(grid, cfg, r)) == ""
    assert "over the site's budget" in _refusal(_train(grid, cfg, 3))


def test_tampered_ledger_is_refused_not_reset(site):
    cfg, node, tmp = site
    grid = LocalGrid(1, node_configs=[node])
    assert _refusal(_train(grid, cfg, 1)) == ""
    path = tmp / "ledger.json"
    body = json.loads(path.read_text())
    body["entries"][0]["epsilon"] = 0.01  # someone "gives back" budget by hand
    path.write_text(json.dumps(body))
    before = path.read_bytes()
    assert "modified or corrupted" in _refusal(_train(grid, cfg, 2))
    assert path.read_bytes() == before


def test_changed_plan_mid_run_is_refused(site):
    cfg, node, _ = site
    grid = LocalGrid(1, node_configs=[node])
    assert _refusal(_train(grid, cfg, 1)) == ""
    assert "cannot change mid-run" in _refusal(_train(grid, cfg.replace(rounds=5), 2))


def test_unknown_label_and_foreign_model_are_refused_with_reasons(site, tmp_path):
    cfg, node, tmp = site
    odd = Examples(["a fine film"] * 20, [0] * 20, ("meh",), "odd")
    node_bad = {**node, "data-path": str(write_examples(odd, tmp / "odd.jsonl")),
                "ledger-path": str(tmp / "other-ledger.json")}
    reason = _refusal(_train(LocalGrid(1, node_configs=[node_bad]), cfg, 1))
    assert "does not fit this run" in reason and "negative" in reason
    wrong = {k: np.zeros((3, 3), np.float32) for k in ("not.a.parameter",)}
    reason = _refusal(_train(LocalGrid(1, node_configs=[node]), cfg, 1, weights=wrong))
    assert "does not match this site's" in reason


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
    from server.checkpoint import load_checkpoint

    cfg, node, tmp = site
    cfg = cfg.replace(strategy="fedadam")
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(CrashingGrid(1, node_configs=[node], crash_at=2), cfg, RUN_ID, resume=True)
    out = tmp / "out"
    ckpt = load_checkpoint(out / "checkpoint")
    assert ckpt.round == 1 and any(k.startswith("m/") for k in ckpt.strategy_state)
    # Under DP the planned rounds cannot change on resume: sites calibrated for them.
    with pytest.raises(CheckpointError, match="rounds"):
        run_federation(LocalGrid(1, node_configs=[node]), cfg.replace(rounds=3), RUN_ID, resume=True)

    summary = run_federation(LocalGrid(1, node_configs=[node]), cfg, RUN_ID, resume=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and [r["round"] for r in rows] == [1, 2]
    job = json.loads((out / "checkpoint" / "job.json").read_text())["job_id"]
    entries = PrivacyLedger.open(tmp / "ledger.json", "alpha", 8.0, 1e-5).entries
    assert [(e.run, e.round) for e in entries] == [(job, 1), (job, 2)]
    # A finished run restarted again trains nothing.
    run_federation(LocalGrid(1, node_configs=[node]), cfg, RUN_ID, resume=True)
    assert len(PrivacyLedger.open(tmp / "ledger.json", "alpha", 8.0, 1e-5).entries) == 2
