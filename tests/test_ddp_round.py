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
from fedseal.common.lora_rule import DISTRIBUTED_BETAS
from fedseal.common.model import build_model, trainable_state
from fedseal.common.refusals import Code
from fedseal.common.secagg_wire import MASKED_INPUT, RECORD, ROUTED, pack_routed, unpack_routed
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


def _weights(cfg: FedConfig) -> dict[str, np.ndarray]:
    """The run's initial global weights (names and shapes are what a round's plan reads)."""
    return {k: v.numpy() for k, v in trainable_state(build_model(cfg, cfg.labels)).items()}


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
    plans = [ddp_wire.plan_round(cfg, _weights(cfg), r, SITES) for r in (1, 2, 3)]
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


def test_lpft_under_distributed_noise_steps_the_adapters_on_the_noisy_sum(tmp_path, tiny_bert, monkeypatch):
    """LP-FT (finetune lora) in 7 rounds: statistics, four head steps, then two adapter steps,
    each one DP-SGD step over all sites. An adapter round's vector is the adapters' and the
    head's clipped gradients (its own, larger, encoding); each site's ledger records every
    step's mechanism and the job's epsilon over all of them stays within the grant; the
    server moved the adapters (LoRA's B starts at zero) and the head, with DP-AdamBC told
    the sum's noise variance for the shares it summed, at the decayed rate."""
    from fedseal.server.ddp_round import DistributedOptimiser

    steps: list[dict] = []
    real_step = DistributedOptimiser.step

    def recorded(self, weights, noisy_sum, keys, **kwargs):
        steps.append(kwargs)
        return real_step(self, weights, noisy_sum, keys, **kwargs)

    monkeypatch.setattr(DistributedOptimiser, "step", recorded)
    cfg = _config(tmp_path, tiny_bert, finetune="lora", rounds=7)
    nodes = _nodes(tmp_path)
    run_federation(LocalGrid(SITES, node_configs=nodes), cfg, run_id=RUN_ID)
    rows = _rows(cfg)
    assert [len(r["contributors"]) for r in rows] == [SITES] * 7
    assert not any(r["abandoned"] or r["refused"] or r["failed"] for r in rows)

    initial = _weights(cfg)
    adapter_keys = ddp_wire.step_keys(initial, cfg, 7)
    assert "classifier.weight" in adapter_keys and any(".lora_B" in k for k in adapter_keys)
    # The layout does not follow the order a message lists the weights in.
    assert ddp_wire.step_keys(dict(reversed(list(initial.items()))), cfg, 7) == adapter_keys
    assert adapter_keys == ddp_wire.step_keys(initial, cfg, 6)
    dims = [ddp_wire.plan_round(cfg, initial, r, SITES).padded_dim for r in range(1, 8)]
    head, adapters = dims[1], dims[5]
    assert dims == [dims[0], head, head, head, head, adapters, adapters]
    assert adapters > head
    assert ddp_wire.round_shape(cfg, initial, 6) == (sum(initial[k].size for k in adapter_keys), 1.0)
    assert [k["adapters"] for k in steps] == [False] * 4 + [True, True]
    assert [k["lr_scale"] for k in steps] == [1.0] * 5 + [0.5]
    for r, k in zip(range(2, 8), steps):
        encoding = ddp_wire.plan_round(cfg, initial, r, SITES)
        assert k["sum_variance"] == pytest.approx(SITES * (encoding.share_sigma / encoding.scale) ** 2)
    for i, node in enumerate(nodes):
        ledger = PrivacyLedger.open(
            node["ledger-path"], f"site-{i}", cfg.epsilon, cfg.delta, key_path=node["ledger-key"]
        )
        entries = ledger.entries
        assert [e.steps for e in entries] == [1, 2, 3, 4, 5, 6, 7]
        assert [int(e.mechanism["dim"]) for e in entries] == dims
        history = site_round._history(ledger, None, entries[-1].run)
        assert entries[-1].epsilon == pytest.approx(site_round.job_epsilon(history, cfg.delta), rel=1e-12)
        assert entries[-1].epsilon <= cfg.epsilon
        assert rows[-1]["epsilon"][f"site-{i}"] == pytest.approx(entries[-1].epsilon, rel=1e-9)
    final = load_checkpoint(Path(cfg.out) / "checkpoint").weights
    lora_b = [k for k in adapter_keys if ".lora_B" in k]
    assert not any(np.any(initial[k]) for k in lora_b)
    assert all(np.any(final[k]) for k in lora_b)
    assert [r["phase"] for r in rows] == ["statistics"] + ["head"] * 4 + ["adapters"] * 2

    # A checkpoint after round 5 written under the earlier split (half the rounds each, so
    # round 5 trained adapters) is refused by this schedule before any site trains again.
    from fedseal.server.checkpoint import CheckpointError, save_checkpoint

    old_rows = [dict(r) for r in rows[:5]]
    old_rows[4]["phase"] = "adapters"
    save_checkpoint(Path(cfg.out) / "checkpoint", 5, final, {}, old_rows, cfg.to_dict())
    with pytest.raises(CheckpointError, match="round 5 of the checkpoint trained 'adapters'.*trains 'head'"):
        run_federation(LocalGrid(SITES, node_configs=nodes), cfg, run_id=RUN_ID, resume=True)
    for i, node in enumerate(nodes):
        ledger = PrivacyLedger.open(
            node["ledger-path"], f"site-{i}", cfg.epsilon, cfg.delta, key_path=node["ledger-key"]
        )
        assert len(ledger.entries) == 7


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
        length = ddp_wire.plan_round(cfg, _weights(cfg), 1, SITES).padded_dim
        assert first["failed"]["site-0"].endswith(f"must be uint32 of shape ({length},)")
        assert first["contributors"] == [] and "threshold" in first["abandoned"]


def _altered_ciphertext(routed: bytes) -> bytes:
    table = unpack_routed(routed)
    sender = min(table)
    message, ct = table[sender]
    return pack_routed({**table, sender: (message, ct[:-1] + bytes([ct[-1] ^ 1]))})


ROUTING_LIES = {
    "truncated routing": lambda routed: routed[:-1],
    "altered ciphertext": _altered_ciphertext,
}


class LyingRouter(LocalGrid):
    """A hostile server: the masked-input request to site 0 carries routed shares it altered."""

    def __init__(self, lie, **kw) -> None:
        super().__init__(SITES, **kw)
        self.lie = lie

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            if (
                msg.metadata.message_type == f"train.{MASKED_INPUT}"
                and msg.metadata.dst_node_id == self.nodes[0]
            ):
                params = msg.content[RECORD]
                params[ROUTED] = self.lie(params[ROUTED])
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("lie", list(ROUTING_LIES))
@pytest.mark.parametrize("noise", ["local", "distributed"])
def test_shares_routed_malformed_or_altered_cost_the_site_no_budget(tmp_path, tiny_bert, noise, lie):
    """The server alters the shares it routes to site 0 for the masked input: the site refuses
    after opening them and before it trains, so its ledger records no step (before, it committed
    the round's spend and then failed to parse them: a server could burn a site's budget)."""
    cfg = _config(tmp_path, tiny_bert, rounds=2, dp_noise=noise)  # the probe needs 2; the lie is in round 1
    nodes = _nodes(tmp_path)
    run_federation(LyingRouter(ROUTING_LIES[lie], node_configs=nodes), cfg, run_id=RUN_ID)
    first = _rows(cfg)[0]
    assert first["failed"]["site-0"].startswith("refused at secagg_masked_input: "), first
    assert first["contributors"] == []  # threshold 3 of 3: the others cannot finish without it

    def entries(i: int):
        node = nodes[i]
        return PrivacyLedger.open(
            node["ledger-path"], f"site-{i}", cfg.epsilon, cfg.delta, key_path=node["ledger-key"]
        ).entries

    assert entries(0) == ()
    assert entries(1) and entries(2)  # they trained and masked round 1: the lie was only site 0's


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(secagg=False), "needs both dp and secagg"),
        (dict(dp=False), "needs both dp and secagg"),
        (dict(finetune="full"), "not supported under --dp-noise distributed; use finetune=probe or lora"),
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
    from fedseal.server.ddp_round import DistributedOptimiser

    weights = {
        "feature_mean": np.zeros(3, np.float32),
        "classifier.weight": np.ones((2, 3), np.float32),
        "classifier.bias": np.zeros(2, np.float32),
    }
    count, labels = 200.0, np.array([50.0, 150.0])
    feature_sum = np.array([20.0, -40.0, 100.0])
    noisy = np.concatenate([feature_sum, labels, [count]]) / math.sqrt(ddp_wire.STATISTICS_PARTS)
    sgd = DistributedOptimiser(lr=2.0, momentum=0.5)
    after = sgd.statistics(weights, noisy)
    np.testing.assert_allclose(after["feature_mean"], feature_sum / count, rtol=1e-6)
    np.testing.assert_allclose(np.exp(after["classifier.bias"]), [0.25, 0.75], rtol=1e-6)
    assert sgd.batch == count
    gradient_sum = np.arange(6.0)
    head = ["classifier.weight"]
    first = sgd.step(after, gradient_sum, head)
    np.testing.assert_allclose(
        first["classifier.weight"], 1.0 - 2.0 * gradient_sum.reshape(2, 3) / count, rtol=1e-6
    )
    resumed = DistributedOptimiser(lr=2.0, momentum=0.5)
    resumed.load_state_dict(sgd.state_dict())
    np.testing.assert_allclose(
        resumed.step(first, gradient_sum, head)["classifier.weight"],
        sgd.step(first, gradient_sum, head)["classifier.weight"],
    )


def _adam_bc_reference(gradients, lr, variance, betas=(0.9, 0.999)):
    """DP-AdamBC's changes written out step by step (Tang et al. 2024, the server's floor)."""
    m = v = 0.0
    changes = []
    for t, g in enumerate(gradients, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        changes.append(-lr * m_hat / np.sqrt(np.maximum(v_hat - variance, max(variance, 1e-16))))
    return changes


def test_the_servers_adapter_step_is_dp_adam_bc_on_the_noisy_mean_split_by_name():
    """An adapter round's noisy sum is the gradients of its weights one after the other in the
    order of the names given; the step is DP-AdamBC at the adapter rate on the mean (the sum
    over the sample size), with the sum's noise variance over the size squared taken out of
    the second moment and flooring it; the moments start afresh (the head rounds' momentum
    has another shape) and resume from a checkpoint; a sum of the wrong length is refused."""
    from fedseal.server.ddp_round import DistributedOptimiser

    weights = {"a.lora_A": np.ones((1, 2), np.float32), "classifier.weight": np.zeros((2, 3), np.float32)}
    opt = DistributedOptimiser(lr=16.0, momentum=0.9, adapter_lr=0.01)
    opt.batch = 10.0
    opt.step(weights, np.ones(6), ["classifier.weight"])  # a head round's momentum
    keys = ["a.lora_A", "classifier.weight"]
    sums = [
        np.array([0.0, 1.0, 2.0, -3.0, 0.01, 5.0, 6.0, 7.0]),
        np.array([0.0, 1.0, -2.0, -3.0, 0.01, 5.0, 6.0, 9.0]),
    ]
    sum_variance = 0.04  # on the mean 4e-4: noise sd 0.02, twenty times the fifth gradient (1e-3)
    expected = _adam_bc_reference([s / 10.0 for s in sums], 0.01, sum_variance / 100.0)
    current, changes = weights, []
    for noisy, change in zip(sums, expected):
        previous = np.concatenate([current[k].reshape(-1) for k in keys])
        current = opt.step(current, noisy, keys, adapters=True, sum_variance=sum_variance)
        changes.append(np.concatenate([current[k].reshape(-1) for k in keys]) - previous)
        np.testing.assert_allclose(changes[-1], change, rtol=1e-5, atol=1e-7)
    assert current["a.lora_A"].shape == (1, 2) and current["classifier.weight"].shape == (2, 3)
    # a coordinate with no signal moves by nothing; the fifth (gradient 1e-3, noise sd 0.02)
    # by a twentieth of the rate, where Adam without the correction moves it by the full rate
    assert changes[0][0] == 0.0 and -changes[0][4] == pytest.approx(0.01 / 20, rel=1e-4)
    plain = DistributedOptimiser(lr=16.0, adapter_lr=0.01)
    plain.batch = 10.0
    moved = plain.step(weights, sums[0], keys, adapters=True)["classifier.weight"].reshape(-1)
    assert -moved[2] == pytest.approx(0.01, rel=1e-4)
    resumed = DistributedOptimiser(lr=16.0, momentum=0.9, adapter_lr=0.01)
    resumed.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(
        resumed.step(current, sums[0], keys, adapters=True, sum_variance=sum_variance)["classifier.weight"],
        opt.step(current, sums[0], keys, adapters=True, sum_variance=sum_variance)["classifier.weight"],
    )
    with pytest.raises(ValueError, match="a step of 8 weights got a gradient of 9"):
        opt.step(weights, np.arange(9.0), keys, adapters=True)
    assert opt.adam_steps == 3 and opt.velocity is not None and opt.velocity.shape == (6,)


def test_the_servers_adapter_step_is_the_sites_dp_adam_bc():
    """The server's DP-AdamBC under the sum's noise and a site's under its own noise
    (:class:`fedseal.client.dp_adam_bc.DPAdamBC`) are one rule: the same noisy mean
    gradients give the same weights, step after step."""
    import torch

    from fedseal.client.dp_adam_bc import DPAdamBC
    from fedseal.server.ddp_round import DistributedOptimiser

    rng = np.random.default_rng(0)
    sums = [rng.normal(0.0, 1.0, 40) * rng.choice([0.01, 1.0], 40) for _ in range(6)]
    batch, sum_variance = 20.0, 0.25
    server = DistributedOptimiser(lr=1.0, adapter_lr=0.01)
    server.batch = batch
    weights = {"w.lora_A": np.zeros(40, np.float32)}
    site_weights = torch.nn.Parameter(torch.zeros(40, dtype=torch.float64))
    site = DPAdamBC([site_weights], lr=0.01, noise_variance=sum_variance / batch**2, floor=1e-16)
    for noisy in sums:
        weights = server.step(weights, noisy, ["w.lora_A"], adapters=True, sum_variance=sum_variance)
        site_weights.grad = torch.from_numpy(noisy / batch)
        site.step()
        np.testing.assert_allclose(weights["w.lora_A"], site_weights.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_the_noise_taken_out_of_adams_second_moment_follows_the_survivors_round_by_round():
    """When the survivors change, the sum's noise variance changes with them, and the second
    moment still holds the earlier rounds' larger noise: what is taken out is the same average
    of each round's variance, so what is left is the signal's square. Taking out only the last
    round's variance (the rule before) left most of the earlier noise in it, and so shortened
    the steps of the coordinates that carry a signal."""
    from fedseal.server.ddp_round import DistributedOptimiser

    rng = np.random.default_rng(7)
    batch, size, lr = 10.0, 200_000, 0.01
    variances = [100.0] * 5 + [1.0] * 2  # per coordinate of the sum: ten shares, then a tenth
    beta1, beta2 = DISTRIBUTED_BETAS
    t = len(variances)
    weights_of = [beta2 ** (t - i) for i in range(1, t + 1)]
    average = sum(w * v for w, v in zip(weights_of, variances)) / sum(weights_of) / batch**2
    signal = np.where(np.arange(size) < size // 2, 2.0 * math.sqrt(average), 0.0)  # on the mean
    opt = DistributedOptimiser(lr=1.0, adapter_lr=lr)
    opt.batch = batch
    weights = {"w.lora_A": np.zeros(size, np.float32)}
    for variance in variances:
        before = weights["w.lora_A"].astype(np.float64)
        noisy = batch * signal + rng.normal(0.0, math.sqrt(variance), size)
        weights = opt.step(weights, noisy, ["w.lora_A"], adapters=True, sum_variance=variance)
    change = weights["w.lora_A"] - before
    assert opt.noise / (1 - beta2**t) == pytest.approx(average, rel=1e-12)
    m_hat, v_hat = opt.moments[0] / (1 - beta1**t), opt.moments[1] / (1 - beta2**t)
    # the step: the moment less the average, floored at it (and at the last round's variance)
    np.testing.assert_allclose(
        change, -lr * m_hat / np.sqrt(np.maximum(v_hat - average, average)), rtol=1e-4, atol=1e-8
    )
    # what is left holds the signal's square alone (a relative standard error of about 0.5% here)
    held = np.mean(v_hat[: size // 2] - average)
    assert held == pytest.approx(4.0 * average, rel=0.03)
    # the last round's variance alone leaves most of the earlier noise, and each signal step shorter
    last = variances[-1] / batch**2
    old = -lr * m_hat / np.sqrt(np.maximum(v_hat - last, max(last, 1e-16)))
    assert np.mean(np.abs(old[: size // 2])) < 0.92 * np.mean(np.abs(change[: size // 2]))
    # after a rise (more survivors) the floor is the round's own variance, not the smaller average
    rising = DistributedOptimiser(lr=1.0, adapter_lr=lr)
    rising.batch = batch
    flat = {"w.lora_A": np.zeros(1000, np.float32)}
    for variance in [1.0] * 5 + [100.0]:
        before = flat["w.lora_A"].astype(np.float64)
        flat = rising.step(
            flat,
            rng.normal(0.0, math.sqrt(variance), 1000),
            ["w.lora_A"],
            adapters=True,
            sum_variance=variance,
        )
    m_hat = rising.moments[0] / (1 - beta1**6)
    bound = lr * np.abs(m_hat) / math.sqrt(100.0 / batch**2)
    assert np.all(np.abs(flat["w.lora_A"] - before) <= bound * (1 + 1e-4) + 1e-8)


def test_the_servers_optimiser_state_survives_a_checkpoint_and_a_malformed_one_is_refused(tmp_path):
    """The Adam moments and step count go through a real checkpoint (safetensors) and resume
    the same steps; a state that :meth:`state_dict` cannot have written is refused with a
    message naming the entry."""
    from fedseal.server.checkpoint import save_checkpoint
    from fedseal.server.ddp_round import DistributedOptimiser

    weights = {"w.lora_A": np.zeros(4, np.float32)}
    opt = DistributedOptimiser(lr=1.0, adapter_lr=0.01)
    opt.batch = 8.0
    for g in (np.array([1.0, -2.0, 0.5, 0.0]), np.array([0.5, -1.0, 2.0, 0.1])):
        weights = opt.step(weights, g, ["w.lora_A"], adapters=True, sum_variance=0.01)
    save_checkpoint(tmp_path, 3, weights, opt.state_dict(), [], {})
    resumed = DistributedOptimiser(lr=1.0, adapter_lr=0.01)
    resumed.load_state_dict(load_checkpoint(tmp_path).strategy_state)
    g = np.array([0.2, 0.3, -0.4, 0.5])
    np.testing.assert_array_equal(
        resumed.step(weights, g, ["w.lora_A"], adapters=True, sum_variance=0.01)["w.lora_A"],
        opt.step(weights, g, ["w.lora_A"], adapters=True, sum_variance=0.01)["w.lora_A"],
    )
    good = opt.state_dict()
    for change, match in [
        ({"ddp/adam-v": np.array([1.0])}, "one shape"),
        ({"ddp/adam-v": -good["ddp/adam-v"] - 1}, "at least 0"),
        ({"ddp/adam-steps": np.array([-1])}, "positive integer"),
        ({"ddp/adam-steps": np.array([2.5])}, "positive integer"),
        ({"ddp/adam-m": np.array([np.nan, 0, 0, 0])}, "not finite"),
        ({"ddp/adam-noise": np.array([-1e-3])}, "variance of at least 0"),
        ({"ddp/batch": np.array([-3.0])}, "sample size"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistributedOptimiser(lr=1.0).load_state_dict({**good, **change})
    partial = {k: v for k, v in good.items() if k != "ddp/adam-steps"}
    with pytest.raises(ValueError, match="all of ddp/adam-m"):
        DistributedOptimiser(lr=1.0).load_state_dict(partial)


def test_a_run_resumed_from_a_malformed_optimiser_state_stops_before_its_first_round(tmp_path, tiny_bert):
    """A checkpoint whose weights fit but whose optimiser state is malformed stops the resumed
    run with a CheckpointError that says what to do, before any site is asked to train."""
    from fedseal.common.vote import round_phase
    from fedseal.server.checkpoint import CheckpointError, save_checkpoint

    cfg = _config(tmp_path, tiny_bert, finetune="lora", rounds=5)
    bad = {
        "ddp/batch": [100.0],
        "ddp/adam-m": np.zeros(3),
        "ddp/adam-v": np.zeros(2),
        "ddp/adam-noise": [0.0],
        "ddp/adam-steps": [1],
    }
    rows = [{"round": r, "phase": round_phase(cfg, r)} for r in (1, 2, 3)]
    save_checkpoint(Path(cfg.out) / "checkpoint", 3, _weights(cfg), bad, rows, cfg.to_dict())
    with pytest.raises(
        CheckpointError, match="optimiser state this run cannot use .*one shape.*start afresh"
    ):
        run_federation(LocalGrid(SITES, node_configs=_nodes(tmp_path)), cfg, run_id=RUN_ID, resume=True)
    assert not (Path(cfg.out) / "metrics.jsonl").exists() or not _rows(cfg)


def test_the_adapter_rate_decays_linearly_over_the_adapter_rounds_and_their_clip_is_1():
    """In a run of 151 rounds the 50 adapter rounds (102 to 151, after 100 head rounds) step
    at 1, 49/50, ... 1/50 of the rate; a step's change scales with it; the adapter rounds'
    vectors are clipped to 1 (the head rounds' to the probe's clip)."""
    from fedseal.server.ddp_round import DistributedOptimiser, adapter_lr_scale

    cfg = FedConfig(clients=4, min_clients=3, dp_noise="distributed", finetune="lora", rounds=151)
    scales = [adapter_lr_scale(cfg, r) for r in range(102, 152)]
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(1 / 50)
    np.testing.assert_allclose(np.diff(scales), -1 / 50)
    assert adapter_lr_scale(cfg.replace(rounds=4), 4) == 1.0  # one adapter round: the full rate
    weights = {"w.lora_A": np.zeros(3, np.float32)}
    full, half = DistributedOptimiser(lr=1.0), DistributedOptimiser(lr=1.0)
    full.batch = half.batch = 4.0
    a = full.step(weights, np.array([1.0, -2.0, 3.0]), ["w.lora_A"], adapters=True)
    b = half.step(weights, np.array([1.0, -2.0, 3.0]), ["w.lora_A"], adapters=True, lr_scale=0.5)
    np.testing.assert_allclose(b["w.lora_A"], 0.5 * a["w.lora_A"], rtol=1e-6)
    model_weights = {
        "feature_mean": np.zeros(4, np.float32),
        "classifier.bias": np.zeros(2, np.float32),
        "classifier.weight": np.zeros((2, 4), np.float32),
        "l.lora_A.default.weight": np.zeros((2, 4), np.float32),
    }
    assert ddp_wire.round_shape(cfg, model_weights, 102) == (16, 1.0)
    assert ddp_wire.round_shape(cfg, model_weights, 101) == (8, ddp_wire.head_clip(cfg))


def test_the_servers_noise_variance_is_the_decoded_sums_own():
    """The variance the adapter step takes out is what the sum of real shares carries: shares
    of zero vectors encoded and decoded by the real encoding, their per-coordinate variance
    against :func:`noise_variance` (within the sampling error of 4 sums of 1,000 coordinates, plus the
    rounding the formula leaves out)."""
    from fedseal.server.ddp_round import noise_variance

    encoding = ddp.plan_encoding(
        dim=1000, clip=0.1, sum_bound=50.0, max_sites=4, noise_multiplier=1.0, honest_shares=2
    )
    seed, rng = bytes(32), ddp.NoiseRandom(bytes(range(32)))
    draws = []
    for _ in range(4):
        ring = np.zeros(encoding.padded_dim, np.uint64)
        for _ in range(3):
            ring += ddp.encode_share(np.zeros(1000), encoding, seed, rng)
        draws.append(ddp.decode_sum((ring % 2**32).astype(np.uint32), encoding, seed, 3))
    measured = float(np.var(np.concatenate(draws)))
    assert measured == pytest.approx(noise_variance(encoding, 3), rel=0.06)
    assert noise_variance(encoding, 3) == pytest.approx(1.5 * noise_variance(encoding, 2))


def test_the_sums_public_bound_is_the_largest_sample_a_site_draws_at_the_planned_rate():
    """A site of max-site-examples records sampled at the planned rate draws more than the
    bound's count with probability below 1e-9; the bound is far below the old
    ``clip * 0.5 * max-site-examples`` (one hostile site's reach within the sum's check)."""
    from scipy.stats import binom

    for batch_size, rate in (("auto", 0.25), (64, 0.5)):
        cfg = FedConfig(clients=4, min_clients=3, dp_noise="distributed", batch_size=batch_size)
        assert ddp_wire.planned_sample_rate(cfg) == rate
        for n in (*range(8, 200), 1_000, 100_000):  # small sites are where the tail is heaviest
            small = ddp_wire.sum_bound(cfg.replace(max_site_examples=n), 1.0)
            assert binom.sf(math.floor(small), n, rate) < 1e-9, n
        count = ddp_wire.sum_bound(cfg, 1.0)
        assert count == pytest.approx(rate * 100_000 + 6 * math.sqrt(rate * 100_000))
        assert ddp_wire.sum_bound(cfg, 0.1) == pytest.approx(0.1 * count)
    assert ddp_wire.sum_bound(FedConfig(max_site_examples=1000), 1.0) < 0.5 * 1000  # the old bound
