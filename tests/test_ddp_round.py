"""Distributed noise wired into the rounds: real ClientApp and ServerApp over the in-process grid.

A tiny BERT, three simulated sites with ledgers, SecAgg+ on, ``dp-noise = distributed``:
the run trains, every site's ledger records each step's real mechanism, and its epsilon is
the direct PLD computation for that mechanism; a site whose policy the round's shares cannot
meet refuses before anything is recorded; a hostile site's out-of-range or wrong-length
share is caught by the server.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import ComposedDpEvent, GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

import fedseal.client.ddp_round as site_round
from fedseal.client.ledger import PrivacyLedger
from fedseal.common import ddp, ddp_wire
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.ddp.accounting import KERNEL_SCALE
from fedseal.common.model import build_model
from fedseal.common.refusals import Code
from fedseal.server.app import run_federation
from fedseal.server.checkpoint import load_checkpoint
from fedseal.simulations.simulate import prepare_sites
from simulations.bench.local_grid import RUN_ID, LocalGrid

SITES = 3


def _config(tmp_path: Path, tiny_bert: str, **changes) -> FedConfig:
    settings = dict(
        model=tiny_bert,
        clients=SITES,
        min_clients=SITES,
        rounds=3,
        max_length=8,
        dp_noise="distributed",
        max_colluders=1,
        out=str(tmp_path / "out"),
    )
    return prepare_sites(FedConfig(**{**settings, **changes}))


def _nodes(tmp_path: Path, policy: dict[int, dict] | None = None) -> list[dict]:
    (tmp_path / "keys").mkdir(exist_ok=True)
    return [
        {
            "partition-id": i,
            "num-partitions": SITES,
            "ledger-path": str(tmp_path / f"site-{i}.ledger.json"),
            "ledger-key": str(tmp_path / "keys" / f"site-{i}.key"),
            **(policy or {}).get(i, {}),
        }
        for i in range(SITES)
    ]


def _rows(cfg: FedConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]


def _site_size(cfg: FedConfig, i: int) -> int:
    return len((Path(cfg.out) / "sites" / f"site-{i}.jsonl").read_text().splitlines())


def test_a_distributed_run_records_each_steps_mechanism_and_the_direct_epsilon(tmp_path, tiny_bert):
    cfg = _config(tmp_path, tiny_bert)
    nodes = _nodes(tmp_path)
    run_federation(LocalGrid(SITES, node_configs=nodes), cfg, run_id=RUN_ID)
    rows = _rows(cfg)
    assert [len(r["contributors"]) for r in rows] == [SITES] * cfg.rounds
    assert not any(r["abandoned"] or r["refused"] or r["failed"] for r in rows)

    # What the server planned, from public values only: one encoding per round.
    model = build_model(cfg, cfg.labels)
    features, labels = model.feature_mean.shape[0], model.classifier.out_features
    plans = [ddp_wire.plan_round(cfg, features, labels, r, SITES) for r in (1, 2, 3)]
    honest = cfg.min_clients - cfg.max_colluders
    for i, node in enumerate(nodes):
        ledger = PrivacyLedger.open(
            node["ledger-path"], f"site-{i}", cfg.epsilon, cfg.delta, key_path=node["ledger-key"]
        )
        entries = ledger.entries
        assert [e.steps for e in entries] == [1, 2, 3]
        events = []
        for entry, encoding in zip(entries, plans):
            d2 = encoding.scale * encoding.clip + math.sqrt(encoding.padded_dim)
            assert entry.mechanism == {
                "share_sigma": encoding.share_sigma,
                "honest_shares": honest,
                "l2_sensitivity": d2,
                "dim": encoding.padded_dim,
            }
            assert entry.sample_rate == 0.25  # the probe's rate (dp_rule.SAMPLE_RATE)
            z = math.sqrt(honest * encoding.share_sigma**2 - KERNEL_SCALE**2) / d2
            assert entry.noise_multiplier == pytest.approx(z, rel=1e-12)
            events.append(
                SelfComposedDpEvent(PoissonSampledDpEvent(entry.sample_rate, GaussianDpEvent(z)), 1)
            )
        # The discrete mechanism is within exp(+-kappa) of a post-processed Gaussian per step
        # (docs/ddp.md); kappa is about 1e-74 here, so it moves epsilon by nothing a float holds.
        kappa = sum(
            ddp.DdgMechanism(
                e.mechanism["share_sigma"],
                int(e.mechanism["honest_shares"]),
                e.mechanism["l2_sensitivity"],
                int(e.mechanism["dim"]),
            ).kappa
            for e in entries
        )
        assert kappa < 1e-70
        direct = (
            PLDAccountant().compose(ComposedDpEvent(events)).get_epsilon(cfg.delta * math.exp(-kappa))
            + 2 * kappa
        )
        assert entries[-1].epsilon == pytest.approx(direct, rel=1e-9)
        assert direct <= cfg.epsilon
        assert rows[-1]["epsilon"][f"site-{i}"] == pytest.approx(direct, rel=1e-9)

    # The server read the federation's statistics from the noisy sum: the step's sample size
    # is q times the federation's size, within sampling and the sum's noise.
    ckpt = load_checkpoint(Path(cfg.out) / "checkpoint")
    batch = float(ckpt.strategy_state["ddp/batch"][0])
    total = sum(_site_size(cfg, i) for i in range(SITES))
    stats = plans[0]
    noise_sd = math.sqrt(3 * SITES) * stats.share_sigma / stats.scale
    spread = math.sqrt(total * 0.25 * 0.75 + noise_sd**2)
    assert abs(batch - 0.25 * total) < 6 * spread
    assert np.abs(ckpt.weights["classifier.weight"]).max() > 0  # the head stepped


@pytest.mark.parametrize(
    "policy, code, setting",
    [
        ({"max-colluders": 1}, Code.POLICY_NOISE_SHARE, "max-colluders"),
        ({"min-cohort": 4}, Code.POLICY_COHORT, "clients"),
    ],
)
def test_a_site_whose_policy_the_round_cannot_meet_refuses_before_spending(
    tmp_path, tiny_bert, policy, code, setting
):
    """The run sizes shares for 3 honest sites (max-colluders 0). Site 2 assumes one colluder
    (so it needs larger shares), or a cohort of 4: it refuses at the keys stage, with public
    values only, and the round is abandoned before anyone records a step."""
    cfg = _config(tmp_path, tiny_bert, max_colluders=0)
    nodes = _nodes(tmp_path, {2: policy})
    run_federation(LocalGrid(SITES, node_configs=nodes), cfg, run_id=RUN_ID)
    first = _rows(cfg)[0]
    assert first["refused"]["site-2"].startswith(code.value)
    assert setting in first["refused"]["site-2"]
    assert first["abandoned"] and first["contributors"] == []
    for i, node in enumerate(nodes):
        ledger = PrivacyLedger.open(
            node["ledger-path"], f"site-{i}", cfg.epsilon, cfg.delta, key_path=node["ledger-key"]
        )
        assert ledger.entries == ()


HOSTILE = {
    "out of range": lambda share: (share + np.uint32(1 << 30)).astype(np.uint32),
    "wrong length": lambda share: np.concatenate([share, share]),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_a_hostile_sites_share_is_caught_by_the_server(tmp_path, tiny_bert, monkeypatch, attack):
    """Site 0 sends a share the protocol cannot produce in the statistics round."""
    cfg = _config(tmp_path, tiny_bert, rounds=2, min_clients=2, max_colluders=0)
    honest_encode = ddp.encode_share
    calls = []

    def hostile(total, encoding, seed, rng=None):
        share = honest_encode(total, encoding, seed, rng)
        calls.append(len(share))
        return HOSTILE[attack](share) if len(calls) == 1 else share  # the first site's, round 1

    monkeypatch.setattr(site_round.ddp, "encode_share", hostile)
    run_federation(LocalGrid(SITES), cfg, run_id=RUN_ID)
    first = _rows(cfg)[0]
    if attack == "out of range":
        assert "decoded sum is refused" in first["abandoned"]
        assert "L2 norm" in first["abandoned"]
        assert first["contributors"] == []
        ckpt_weights = load_checkpoint(Path(cfg.out) / "checkpoint").weights
        assert not np.any(ckpt_weights["feature_mean"])  # round 1 changed nothing
    else:
        # Dropped at the masked input for its reply's form; with three sites SecAgg+'s
        # threshold is 3, so the two left cannot unmask the sum: nothing is decoded.
        model = build_model(cfg, cfg.labels)
        length = ddp_wire.plan_round(
            cfg, model.feature_mean.shape[0], model.classifier.out_features, 1, SITES
        ).padded_dim
        assert first["failed"]["site-0"].endswith(f"must be uint32 of shape ({length},)")
        assert first["contributors"] == [] and "threshold" in first["abandoned"]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(secagg=False), "needs both dp and secagg"),
        (dict(dp=False), "needs both dp and secagg"),
        (dict(finetune="lora"), "not yet supported under --dp-noise distributed; use local"),
        (dict(finetune="full"), "not yet supported under --dp-noise distributed; use local"),
        (dict(local_steps=5), "leave local-steps auto"),
        (dict(min_clients=2, max_colluders=1), "raise min-clients"),
    ],
)
def test_distributed_noise_refuses_a_config_it_cannot_serve(change, match):
    base = dict(clients=4, min_clients=3, dp_noise="distributed")
    with pytest.raises(ConfigError, match=match):
        FedConfig(**{**base, **change})
    assert FedConfig(**{**base, **change, "dp_noise": "local"}).dp_noise == "local"


def test_the_servers_optimiser_reads_the_statistics_and_resumes_from_its_state():
    """The statistics sum gives the mean, the log prior and the step's sample size; a head step
    divides the gradient sum by that size; a checkpointed state resumes the same momentum."""
    from fedseal.server.ddp_round import DistributedSgd

    weights = {
        "feature_mean": np.zeros(3, np.float32),
        "classifier.weight": np.ones((2, 3), np.float32),
        "classifier.bias": np.zeros(2, np.float32),
    }
    count, labels = 200.0, np.array([50.0, 150.0])
    feature_sum = np.array([20.0, -40.0, 100.0])
    noisy = np.concatenate([feature_sum, labels, [count]]) / math.sqrt(ddp_wire.STATISTICS_PARTS)
    sgd = DistributedSgd(lr=2.0, momentum=0.5)
    after = sgd.statistics(weights, noisy)
    np.testing.assert_allclose(after["feature_mean"], feature_sum / count, rtol=1e-6)
    np.testing.assert_allclose(np.exp(after["classifier.bias"]), [0.25, 0.75], rtol=1e-6)
    assert sgd.batch == count
    gradient_sum = np.arange(6.0)
    first = sgd.step(after, gradient_sum)
    np.testing.assert_allclose(
        first["classifier.weight"], 1.0 - 2.0 * gradient_sum.reshape(2, 3) / count, rtol=1e-6
    )
    resumed = DistributedSgd(lr=2.0, momentum=0.5)
    resumed.load_state_dict(sgd.state_dict())
    np.testing.assert_allclose(
        resumed.step(first, gradient_sum)["classifier.weight"],
        sgd.step(first, gradient_sum)["classifier.weight"],
    )
