"""What one hostile site of m can do to a round, bounded and tested with its worst reply.

Plain path (the server sees each site's reply), ``fedseal.server.aggregate.robust_sum``:

* a training round moves only the head's weights; the bias and the feature mean stay
  as the statistics round set them, whatever a site sends;
* each coordinate of the mean vote moves by at most ``2 / m`` (equal weights);
* the step's scale stays within the other sites' scales (m >= 3);
* each pooled value of the statistics round moves by at most ``2 / ceil(m / 2)``,
  whatever weight the site claims.

Identity: records are keyed by the sender; a reply naming another site is refused and
recorded under its sender.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Message

from fedseal.common import egress
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import FEATURE_MEAN_KEY, HEAD_WEIGHT_KEY, PRIOR_KEY
from fedseal.common.model import build_model, trainable_state
from fedseal.common.records import config_to_record, state_to_record, to_numpy_state
from fedseal.common.vote import SCALE_KEY, from_votes, round_clip, update_template
from fedseal.common.weights import weight_range
from fedseal.server.aggregate import RoundSums, robust_sum, sum_plain
from fedseal.server.app import run_federation
from fedseal.server.identity import SiteNames, admitted_keys, names_from_nodes
from fedseal.simulations.simulate import prepare_sites
from simulations.bench.local_grid import RUN_ID, LocalGrid


def _vote(rng, shape, scale_entry, weight=1.0):
    votes = {"w": np.clip(rng.normal(0, 0.5, size=shape), -1, 1) * weight}
    votes[SCALE_KEY] = np.array([scale_entry * weight])
    return votes


@pytest.mark.parametrize("m", [3, 5, 10])
def test_one_site_moves_each_mean_vote_by_at_most_two_over_m_and_cannot_set_the_scale(m):
    rng = np.random.default_rng(m)
    honest = [_vote(rng, (2, 8), rng.uniform(-0.3, 0.1)) for _ in range(m - 1)]
    own = _vote(rng, (2, 8), -0.1)  # what the site would have sent honestly
    worst = {"w": -np.sign(own["w"] + 1e-9) * 1e9, SCALE_KEY: np.array([1e9])}  # at the extremes
    clean, w_clean = robust_sum([(u, 1.0) for u in [*honest, own]], clip=1.0)
    bad, w_bad = robust_sum([(u, 1.0) for u in [*honest, worst]], clip=1.0)
    moved = np.abs(bad["w"] / w_bad - clean["w"] / w_clean)
    assert moved.max() <= 2 / m + 1e-12
    assert moved.max() > 2 / m - 0.5  # the bound is nearly reached: the test has teeth
    entries = [float(u[SCALE_KEY][0]) for u in honest]
    scale_entry = float(bad[SCALE_KEY][0] / w_bad)
    assert min(entries) <= scale_entry <= max(entries)
    _, scale = from_votes({k: v / w_bad for k, v in bad.items()}, clip=64.0)
    assert scale <= math.exp(max(entries) * math.log(1e6)) + 1e-9


def test_the_old_mean_scale_let_one_site_of_three_multiply_the_step():
    """What the median replaced: with the mean of the scale entries, one site of three set to
    the top of the span multiplied the step by e^(2 LOG_SPAN / 3) (the issue's 190x)."""
    honest = [-0.14, -0.15]  # log(tau) / log(1e6) for tau about 0.13 and 0.12
    mean_scale = math.exp(np.mean([*honest, 1.0]) * math.log(1e6))
    median_scale = math.exp(np.median([*honest, 1.0]) * math.log(1e6))
    assert mean_scale / median_scale > 100
    assert median_scale <= math.exp(max(honest) * math.log(1e6))


@pytest.mark.parametrize("m", [3, 4, 10])
def test_a_site_claiming_the_size_cap_moves_pooled_statistics_by_at_most_its_share(m):
    """Honest small sites (weight 0.02) and one that claims weight 1: each pooled value moves
    by at most 2 / ceil(m / 2) against the site sending its own honest statistics."""
    rng = np.random.default_rng(m)
    honest = [(rng.uniform(-0.2, 0.2, size=16) * 0.02, 0.02) for _ in range(m - 1)]
    own = (rng.uniform(-0.2, 0.2, size=16) * 0.02, 0.02)
    liar = (np.ones(16) * 1.0, 1.0)  # every coordinate at the bound, the largest weight
    clean, wc = robust_sum([({"x": u}, w) for u, w in [*honest, own]], clip=1.0)
    bad, wb = robust_sum([({"x": u}, w) for u, w in [*honest, liar]], clip=1.0)
    moved = np.abs(bad["x"] / wb - clean["x"] / wc)
    assert moved.max() <= 2 / math.ceil(m / 2) + 1e-12
    assert wb <= wc * 2  # the liar counts as the median site, not 50 of them


def test_training_rounds_move_only_the_head_weights(tiny_bert, tmp_path):
    """A real run: the bias and the feature mean after the last round are exactly what the
    statistics round set; a site adding them to a training-round reply is dropped."""
    cfg = prepare_sites(
        FedConfig(
            model=tiny_bert,
            clients=3,
            min_clients=2,
            rounds=3,
            max_length=8,
            local_steps=4,
            secagg=False,
            dp=False,
            out=str(tmp_path / "run"),
        )
    )
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    assert list(update_template(weights, cfg, 1)) == [FEATURE_MEAN_KEY, PRIOR_KEY]
    assert list(update_template(weights, cfg, 2)) == [HEAD_WEIGHT_KEY, SCALE_KEY]

    class Snapshots(LocalGrid):
        """Records the global weights each training message carries."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.globals = []

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                record = messages[0].content["global"]
                self.globals.append({k: a.numpy().copy() for k, a in record.items()})
            return super().send_and_receive(messages, timeout=timeout)

    grid = Snapshots(3)
    run_federation(grid, cfg, run_id=RUN_ID)
    after_stats, later = grid.globals[1], grid.globals[2]
    for key in (FEATURE_MEAN_KEY, PRIOR_KEY):
        assert np.array_equal(after_stats[key], later[key])
    assert not np.array_equal(grid.globals[0][HEAD_WEIGHT_KEY], later[HEAD_WEIGHT_KEY])

    # A site sending the frozen keys in a training round is dropped, named, and not counted.
    content = {
        "global": state_to_record(weights),
        "config": config_to_record(cfg, **{"server-round": 2, "job-id": "j"}),
    }
    from flwr.app import RecordDict

    replies = grid.send_and_receive(
        [Message(RecordDict(content), dst_node_id=n, message_type="train") for n in grid.nodes]
    )
    bad = replies[0]
    bad.content["update"][FEATURE_MEAN_KEY] = state_to_record({"x": weights[FEATURE_MEAN_KEY]})["x"]
    template = update_template(weights, cfg, 2)
    sums = sum_plain(
        replies, template, RoundSums(), egress.VOTE, SiteNames(), weight_range(cfg, 2), round_clip(cfg, 2)
    )
    assert len(sums.contributors) == 2
    assert any(why.startswith("reply.extra") for why in sums.failed.values())


def test_a_reply_naming_another_site_is_refused_and_recorded_under_its_sender(tiny_bert, tmp_path):
    cfg = prepare_sites(
        FedConfig(
            model=tiny_bert,
            clients=3,
            min_clients=2,
            rounds=2,
            max_length=8,
            local_steps=2,
            secagg=False,
            out=str(tmp_path / "run"),
        )
    )
    grid = LocalGrid(3)
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    from flwr.app import RecordDict

    content = RecordDict(
        {
            "global": state_to_record(weights),
            "config": config_to_record(cfg, **{"server-round": 1, "job-id": "j"}),
        }
    )
    replies = grid.send_and_receive(
        [Message(content, dst_node_id=n, message_type="train") for n in grid.nodes]
    )
    alpha, beta, liar = grid.nodes
    names = SiteNames({alpha: "alpha", beta: "beta", liar: "gamma"})  # authenticated
    replies[2].content["status"]["site"] = "alpha"  # gamma writes as alpha
    replies[0].content["status"]["site"] = "alpha"
    replies[1].content["status"]["site"] = "beta"
    template = update_template(weights, cfg, 1)
    sums = sum_plain(
        replies, template, RoundSums(), egress.STATISTICS, names, weight_range(cfg, 1), round_clip(cfg, 1)
    )
    assert sorted(sums.contributors) == ["alpha", "beta"]
    assert list(sums.failed) == ["gamma"] and sums.failed["gamma"].startswith("reply.identity")
    assert set(sums.epsilons) == {"alpha", "beta"}  # alpha's record is alpha's own


def test_in_a_simulation_a_name_held_by_another_node_cannot_be_claimed():
    names = SiteNames()
    first = Message(RecordDict_with_status("alpha"), reply_to=_request(1))
    first.metadata.__dict__["_src_node_id"] = 1
    second = Message(RecordDict_with_status("alpha"), reply_to=_request(2))
    second.metadata.__dict__["_src_node_id"] = 2
    assert names.claim(first) == "alpha"
    with pytest.raises(egress.ReplyError) as err:
        names.claim(second)
    assert err.value.reason == egress.REPLY_IDENTITY and names.of(second) == "node 2"


def RecordDict_with_status(site):  # noqa: N802 - a small factory
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"status": ConfigRecord({"site": site})})


def _request(node):
    from flwr.app import RecordDict

    msg = Message(RecordDict(), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m{node}"
    return msg


def test_a_deployed_server_names_sites_by_the_key_they_authenticated_with(tmp_path):
    """NodeInfo carries the PEM key the SuperLink authenticated; the roster holds OpenSSH .pub
    files: the same key matches whatever its encoding, another key matches nothing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.proto.node_pb2 import NodeInfo

    from fedseal.server.keys import site_key_files

    pems = {}
    for name in ("alpha", "beta"):
        _, pub = site_key_files(name)
        (tmp_path / f"{name}.pub").write_bytes(pub)
        key = load_ssh_public_key(pub.strip())
        pems[name] = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    _, stranger = site_key_files("mallory")
    stranger_pem = load_ssh_public_key(stranger.strip()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    nodes = [
        NodeInfo(node_id=11, public_key=pems["alpha"]),
        NodeInfo(node_id=12, public_key=pems["beta"]),
        NodeInfo(node_id=13, public_key=stranger_pem),
        NodeInfo(node_id=14),
    ]
    assert names_from_nodes(nodes, admitted_keys(tmp_path)) == {11: "alpha", 12: "beta"}
