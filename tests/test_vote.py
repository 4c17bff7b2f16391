"""The scale-free vote (fedseal.common.vote): what a site sends and what the server steps by."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedseal.common.config import FedConfig
from fedseal.common.records import flatten
from fedseal.common.vote import (
    LOG_SPAN,
    SCALE_KEY,
    VOTE_UNIT,
    from_votes,
    is_vote_round,
    round_clip,
    site_scale,
    to_votes,
    update_template,
)


def test_known_answer_votes_and_their_order_in_the_masked_vector():
    """A fixed update gives fixed votes, in the model's key order with log(tau) last:
    the layout sites and server agree on inside the masked vector."""
    update = {"w": np.array([[1.5, -6.0], [0.0, 3.0]]), "b": np.array([-0.75, 12.0])}
    votes = to_votes(update)
    assert list(votes) == ["w", "b", SCALE_KEY]
    assert SCALE_KEY == "fedseal.vote.log_scale" and VOTE_UNIT == 3.0
    # tau: 3 x the median of |1.5, 6, 3, 0.75, 12| (the untrained 0 left out) = 9
    assert site_scale(update) == 9.0
    assert flatten(votes).tolist() == pytest.approx(
        [1 / 6, -2 / 3, 0.0, 1 / 3, -1 / 12, 1.0, math.log(9.0) / LOG_SPAN], abs=1e-7
    )
    scaled = to_votes({k: 8 * v for k, v in update.items()})
    assert flatten(scaled)[:-1].tolist() == flatten(votes)[:-1].tolist()  # votes are scale-free
    assert flatten(scaled)[-1] == pytest.approx(math.log(72) / LOG_SPAN)
    assert LOG_SPAN == pytest.approx(13.815510557964274)  # the span is part of the format


def test_an_update_that_did_not_move_sends_no_votes_and_a_neutral_scale():
    votes = to_votes({"w": np.zeros(3)})
    assert flatten(votes).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_the_step_is_the_mean_vote_times_the_geometric_mean_scale():
    sites = [to_votes({"w": np.array([2.0, -2.0, 1.0])}), to_votes({"w": np.array([8.0, 8.0, -8.0])})]
    mean = {k: (sites[0][k] + sites[1][k]) / 2 for k in sites[0]}
    step, scale = from_votes(mean, clip=64.0)
    assert scale == pytest.approx(math.sqrt(6.0 * 24.0))  # geometric mean of the taus 6 and 24
    assert step["w"].tolist() == pytest.approx([4.0, 0.0, -1.0])  # votes [1/3, 0, -1/12]
    assert SCALE_KEY not in step


def test_a_forged_scale_cannot_push_the_step_past_the_update_clip():
    """A mean scale entry at its bound (every site claiming tau = 1e6), or NaN: the
    step per coordinate stays within update-clip, or is no step at all."""
    huge, scale = from_votes({"w": np.array([1.0, -5.0]), SCALE_KEY: np.array([1.0])}, clip=64.0)
    assert scale == 64.0 and huge["w"].tolist() == [64.0, -64.0]
    nan, scale = from_votes({"w": np.array([1.0]), SCALE_KEY: np.array([np.nan])}, clip=64.0)
    assert scale == 0.0 and nan["w"].tolist() == [0.0]


def test_one_loud_site_no_longer_decides_the_round():
    """Nine sites agree on the direction of a small move; one small site's update is
    noise a hundred times larger (DP noise of a site with few examples, or a drifted
    head). The plain mean points where the loud site points; the vote keeps the
    nine sites' direction (measured on SST-2, docs/benchmarks.md)."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=500)
    honest = [{"w": signal + 0.3 * rng.normal(size=500)} for _ in range(9)]
    loud = {"w": 100 * rng.normal(size=500)}
    updates = honest + [loud]

    def cosine(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    plain = np.mean([u["w"] for u in updates], axis=0)
    votes = [to_votes(u) for u in updates]
    step, _ = from_votes({k: np.mean([v[k] for v in votes], axis=0) for k in votes[0]}, 64.0)
    assert cosine(plain, signal) < 0.2
    assert cosine(step["w"], signal) > 0.9


@pytest.mark.parametrize(
    ("changes", "votes_in"),
    [
        ({}, {2, 3}),  # probe: round 1 is the statistics round, training rounds vote
        ({"aggregation": "mean"}, set()),
        # LP-FT: statistics, the probe's head round (votes), its adapter round (plain)
        ({"finetune": "lora"}, {2}),
        ({"finetune": "lora", "aggregation": "vote"}, {2, 3}),
        ({"finetune": "full"}, set()),  # auto: full fine-tuning sends plain updates
        ({"finetune": "full", "aggregation": "vote"}, {1, 2, 3}),
    ],
)
def test_which_rounds_vote(changes, votes_in):
    """Which rounds vote, and what each round moves: the statistics round (probe, LP-FT) its
    feature mean and bias, the probe's training rounds its head's weights, LP-FT's adapter
    round the adapters and the head's weights; full fine-tuning every trainable weight."""
    cfg = FedConfig(rounds=3, **changes)
    weights = {
        k: np.zeros((2, 2), dtype=np.float32)
        for k in ("feature_mean", "classifier.weight", "classifier.bias", "layer.1.query.lora_A")
    }
    assert {r for r in (1, 2, 3) if is_vote_round(cfg, r)} == votes_in
    for r in (1, 2, 3):
        if cfg.finetune == "full":
            moved = list(weights)
        elif r == 1:
            moved = ["feature_mean", "classifier.bias"]
        elif cfg.finetune == "lora" and r == 3:
            moved = ["classifier.weight", "layer.1.query.lora_A"]
        else:
            moved = ["classifier.weight"]
        template = update_template(weights, cfg, r)
        assert list(template) == (moved + [SCALE_KEY] if r in votes_in else moved)


def test_a_typo_in_aggregation_names_the_choices():
    from fedseal.common.config import ConfigError

    with pytest.raises(ConfigError, match="aggregation.*vote"):
        FedConfig(aggregation="votes")


def test_a_vote_round_is_encoded_on_the_bound_of_one_for_secure_aggregation():
    """Every entry of a vote round lies in [-1, 1], so the masked vector's grid is 64
    times finer than at update-clip, and a site's entry of 1e9 counts as 1."""
    from fedseal.common.secagg_wire import decode_sum, encode_update, quant_config

    cfg = FedConfig()
    assert round_clip(cfg, 1) == 1.0 and round_clip(cfg, 2) == 1.0  # statistics, then votes
    assert round_clip(cfg.replace(aggregation="mean"), 2) == cfg.update_clip
    votes = to_votes({"w": np.array([3.0, -0.5, 1.0, 0.0])})
    flat = flatten(votes)
    n = 10
    total = encode_update(flat, 1.0, n, 1.0) + encode_update(np.full(5, 1e9), 1.0, n, 1.0)
    summed, weight = decode_sum(total, n, 2, (1.0, 1.0), 1.0)
    grid = 1.0 / quant_config(n, 1.0).max_level
    assert weight == pytest.approx(2.0)
    assert np.allclose(summed, flat + 1.0, atol=2 * grid)
    assert grid * cfg.update_clip == pytest.approx(
        cfg.update_clip / quant_config(n, cfg.update_clip).max_level
    )


def test_a_site_that_departs_from_the_protocol_is_bounded_only_by_the_update_clip():
    """Under secure aggregation the server checks only the sum's range. Nine honest
    sites vote [1/3, -1/3, 1/6] with a small move; a tenth sends raw levels its encoder
    would never produce. The sum decodes, the direction is the tenth site's, and the
    one bound left holds: no coordinate of the step exceeds update-clip. (docs/threat-model.md
    threat model says so; the vote bounds honest drift and noise, not this.)"""
    from fedseal.common.secagg import quantize
    from fedseal.common.secagg_wire import decode_sum, encode_update, quant_config

    cfg, n = FedConfig(), 10
    honest = flatten(to_votes({"w": np.array([1e-3, -1e-3, 5e-4])}))
    total = sum(encode_update(honest, 1.0, n, 1.0) for _ in range(n - 1))
    quant = quant_config(n, 1.0)
    # as far as the sum's range check lets it: each entry of the sum at -n or +n
    edge = n - 0.01  # just inside the range, whatever the honest entries' rounding
    forged = (
        np.append(np.array([-edge, edge, -edge, edge]) - (n - 1) * honest[:4].astype(np.float64), 1.0)
        * quant.max_level
    )
    total = (
        total + quantize(np.zeros(5), quant) + (np.rint(forged).astype(np.int64) % 2**32).astype(np.uint32)
    )
    summed, weight = decode_sum(total, n, n, (1.0, 1.0), 1.0)
    step, scale = from_votes({"w": summed[:3] / weight, SCALE_KEY: summed[3:4] / weight}, cfg.update_clip)
    assert np.sign(step["w"]).tolist() == [-1.0, 1.0, -1.0]  # the forger's direction
    assert scale == cfg.update_clip and np.abs(step["w"]).max() <= cfg.update_clip
