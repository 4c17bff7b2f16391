"""SecAgg+ over real Flower messages and the real ClientApp (in-process grid).

Each site's encoded vector is recorded as it is produced, so the server's
recovered sum can be checked *exactly* against the plain sum over the sites
whose masked input arrived, with sites vanishing at every stage.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

import client.secagg as client_secagg
from common.config import FedConfig
from common.model import build_model, trainable_state
from common.records import config_to_record, flatten, state_to_record, to_numpy_state
from common.secagg_wire import decode_sum
from server.secagg import secure_round
from simulations.simulate import prepare_sites
from simulations.local_grid import RUN_ID, LocalGrid

STAGES = ["train", "train.secagg_share_keys", "train.secagg_masked_input", "train.secagg_unmask"]


@pytest.fixture(scope="module")
def setup(tiny_bert, tmp_path_factory):
    cfg = prepare_sites(FedConfig(model=tiny_bert, finetune="full", dp=False, clients=5,
                                  rounds=1, local_steps=2, batch_size=16, max_length=24,
                                  out=str(tmp_path_factory.mktemp("secagg-flower"))))
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    return cfg, weights


def _run(setup, monkeypatch, drop=None, n=5):
    cfg, weights = setup
    recorded: dict[int, np.ndarray] = {}
    real = client_secagg.encode_update

    def spy(update, weight, cfg_, n_):
        x = real(update, weight, cfg_, n_)
        recorded[len(recorded)] = (update, weight, x)
        return x

    monkeypatch.setattr(client_secagg, "encode_update", spy)
    grid = LocalGrid(n, drop=drop)
    content = RecordDict({"global": state_to_record(weights),
                          "config": config_to_record(cfg, **{"server-round": 1})})
    sums = secure_round(grid, grid.nodes, content, weights, cfg, RUN_ID, 1)
    # Sites train in node order, so recorded[i] belongs to grid.nodes[i] (minus
    # those that vanished before encoding).
    trained = [node for node in grid.nodes if not (grid.drop.get(node) == "train")]
    by_node = dict(zip(trained, recorded.values()))
    return cfg, grid, sums, by_node


def test_recovered_sum_is_exact_and_close_to_the_float_sum(setup, monkeypatch):
    cfg, grid, sums, by_node = _run(setup, monkeypatch)
    assert len(sums.contributors) == 5 and not sums.abandoned
    plain_q = np.zeros_like(next(iter(by_node.values()))[2])
    for _, _, x in by_node.values():
        plain_q += x  # uint32 arithmetic wraps mod 2**32, as the protocol does
    expected, expected_w = decode_sum(plain_q, cfg, 5)
    np.testing.assert_array_equal(flatten(sums.update_sum), expected.astype(np.float32))
    assert sums.weight_sum == expected_w
    # Against the unquantised float sum: off by at most half a grid step per site.
    float_sum = sum(u for u, _, _ in by_node.values())
    step = cfg.update_clip / ((2**31 - 1) // 5)
    assert np.max(np.abs(flatten(sums.update_sum) - float_sum)) <= 5 * 0.5 * step + 1e-12
    assert abs(sums.weight_sum - sum(w for _, w, _ in by_node.values())) < 1e-6


@pytest.mark.parametrize("stage", STAGES)
def test_dropout_at_each_stage_still_gives_the_survivors_exact_sum(setup, monkeypatch, stage):
    cfg, grid, sums, by_node = _run(setup, monkeypatch, drop={1: stage})
    dropped = grid.nodes[1]
    contributed_input = stage == "train.secagg_unmask"  # its masked input had arrived
    included = [n for n in grid.nodes if n != dropped or contributed_input]
    assert len(sums.contributors) == len(included)
    total = np.zeros_like(next(iter(by_node.values()))[2])
    for node in included:
        total += by_node[node][2]
    expected, _ = decode_sum(total, cfg, 5)
    np.testing.assert_array_equal(flatten(sums.update_sum), expected.astype(np.float32))


def test_too_few_survivors_abandons_the_round(setup, monkeypatch):
    cfg, grid, sums, _ = _run(setup, monkeypatch, drop={0: STAGES[1], 1: STAGES[1], 2: STAGES[1]})
    assert sums.update_sum is None and sums.mean_update() is None
    assert "share" in sums.abandoned or "threshold" in sums.abandoned or sums.abandoned


def test_no_site_update_reaches_the_server_in_the_clear(setup, monkeypatch):
    """The only update-sized thing a site sends is its masked vector."""
    cfg, grid, sums, by_node = _run(setup, monkeypatch)
    node = grid.nodes[0]
    state = grid.contexts[node].state
    assert "fedseal.secagg.input" not in state and "fedseal.secagg.state" not in state
