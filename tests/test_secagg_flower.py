"""SecAgg+ over real Flower messages, the real ClientApp and the real coordinator.

Each site's encoded vector is recorded as it is produced, so the server's
recovered sum can be checked *exactly* against the plain sum over the sites
whose masked input arrived: with sites vanishing at every stage, and with one
site sending something malformed at every stage (it is named, the others'
sum stays exact). Most tests use :class:`QuickGrid`, whose sites skip local
training (an update drawn at random goes through the site's real policy check
and ``begin_round``); the rest of every stage is the real ClientApp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedseal.client.secagg as client_secagg
from fedseal.client.reply import message_round
from fedseal.client.site import simulation_site_file, site_settings
from fedseal.common import egress
from fedseal.common.config import FedConfig
from fedseal.common.model import build_model, trainable_state
from fedseal.common.records import (
    config_to_record,
    flatten,
    record_to_config,
    state_to_record,
    to_numpy_state,
)
from fedseal.common.secagg import generate_identity
from fedseal.common.secagg_wire import (
    ADVERT,
    B_SHARES,
    CIPHERTEXTS,
    COMPLAINTS,
    MASKED,
    NODES,
    RECORD,
    SHARES,
    SIGNATURE,
    STAGES,
    Y,
    decode_sum,
    pack_ids,
    pack_shares,
    unpack_ids,
    unpack_shares,
    unpack_table,
)
from fedseal.common.weights import weight_range
from fedseal.server.secagg import secure_round
from fedseal.simulations.simulate import prepare_sites
from simulations.bench.local_grid import RUN_ID, LocalGrid

TRAIN = "train"
ALL_STAGES = [TRAIN, *(f"train.{s}" for s in STAGES)]
N = 5


@pytest.fixture(scope="module")
def setup(tiny_bert, tmp_path_factory):
    cfg = prepare_sites(
        FedConfig(
            model=tiny_bert,
            finetune="full",
            dp=False,
            clients=N,
            rounds=1,
            local_steps=2,
            batch_size=16,
            max_length=24,
            out=str(tmp_path_factory.mktemp("secagg-flower")),
        )
    )
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    return cfg, weights


class Recorder:
    """Spies on ``encode_update`` so the test knows every site's exact encoding."""

    def __init__(self, monkeypatch) -> None:
        self.by_node: dict[int, np.ndarray] = {}
        real = client_secagg.encode_update
        self.pending: list[np.ndarray] = []
        self.updates: list[np.ndarray] = []

        def spy(update, weight, n_, clip_):
            x = real(update, weight, n_, clip_)
            self.pending.append(x)
            self.updates.append(np.asarray(update, dtype=np.float64) * 1.0)
            return x

        monkeypatch.setattr(client_secagg, "encode_update", spy)


class QuickGrid(LocalGrid):
    """LocalGrid whose sites skip local training: at the masked-input stage each sends an
    update drawn at random (through the site's real encoding and masking); every other
    step is the real ClientApp. ``mutate(node, type, reply)`` may corrupt one reply as it
    comes back."""

    QUICK = (TRAIN, f"train.{STAGES[1]}")  # the two stages whose site-side work is skipped

    def __init__(self, n, recorder, *, mutate=None, seed=0, **kw) -> None:
        super().__init__(n, **kw)
        self.recorder, self.mutate = recorder, mutate
        self.rng = np.random.default_rng(seed)
        self.asked: dict[int, tuple] = {}

    def _train(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        cfg = record_to_config(msg.content["config"])
        site = site_settings(context.node_config, cfg)
        job, server_round = message_round(msg.content, context)
        client_secagg.check_round(msg.content, context, site, server_round)
        length = sum(a.numpy().size for a in msg.content["global"].values())
        self.asked[context.node_id] = (cfg, site, length)
        keys = client_secagg.begin_round(msg, context, site, job, server_round)
        return egress.build(
            egress.SECAGG_ADVERT, msg, {RECORD: keys, "status": {"site": site.name, "private": False}}
        )

    def _masked(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        cfg, site, length = self.asked[context.node_id]
        update = self.rng.normal(0, 0.3, size=length)
        routed = client_secagg.open_routed(msg, context)
        y, complaints = client_secagg.masked_input(context, routed, cfg, update, 1.0)
        self.recorder.by_node[context.node_id] = self.recorder.pending.pop()
        metrics = {"epsilon": -1.0, "delta": -1.0, "steps": 0, "noise-multiplier": 0.0, "sample-rate": 0.0}
        return egress.build(
            egress.SECAGG_MASKED_INPUT,
            msg,
            {
                MASKED: {Y: y},
                RECORD: {COMPLAINTS: complaints},
                "metrics": metrics,
                "status": {"site": site.name, "private": False},
            },
        )

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        quick = [m for m in messages if m.metadata.message_type in self.QUICK]
        replies = super().send_and_receive([m for m in messages if m not in quick], timeout=timeout)
        for msg in quick:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent.append(kind)
            if self.drop.get(node) == kind:
                self.gone.add(node)
            if node in self.gone:
                continue
            if not msg.metadata.message_id:
                msg.metadata.__dict__["_message_id"] = f"quick-{node}-{len(self.sent)}"
            try:
                replies.append(self._train(msg) if kind == TRAIN else self._masked(msg))
            except Exception as exc:  # what the real handler answers: a refusal with a code
                from fedseal.client.reply import as_refusal, refusal

                replies.append(refusal(msg, self.contexts[node], as_refusal(exc, stage=True)))
        if self.mutate:
            for reply in replies:
                if not reply.has_error():
                    self.mutate(reply.metadata.src_node_id, messages[0].metadata.message_type, reply)
        return replies


def _content(cfg, weights, server_round=1, job="job-1"):
    return RecordDict(
        {
            "global": state_to_record(weights),
            "config": config_to_record(cfg, **{"server-round": server_round, "job-id": job}),
        }
    )


def _expected(cfg, xs, nodes, n=N):
    total = np.zeros_like(next(iter(xs.values())))
    for node in nodes:
        total += xs[node]  # uint32 arithmetic wraps mod 2**32, as the protocol does
    return decode_sum(total, n, len(nodes), weight_range(cfg, 1), cfg.update_clip)


def _check_exact(cfg, grid, sums, xs, nodes):
    expected, expected_w = _expected(cfg, xs, nodes)
    np.testing.assert_array_equal(flatten(sums.update_sum), expected.astype(np.float32))
    assert sums.weight_sum == expected_w == len(nodes)  # equal weights: exactly the count
    assert sorted(sums.contributors) == sorted(f"site-{grid.nodes.index(i)}" for i in nodes)


# ------------------------------------------------------ with real training
def test_recovered_sum_is_exact_and_close_to_the_float_sum(setup, monkeypatch):
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    grid = LocalGrid(N)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert not sums.abandoned and not sums.failed and len(sums.contributors) == N
    xs = dict(zip(grid.nodes, rec.pending))  # sites train in node order
    _check_exact(cfg, grid, sums, xs, grid.nodes)
    # against the unquantised float sum: off by at most half a grid step per site
    step = cfg.update_clip / ((2**31 - 1) // (2 * N))
    float_sum = np.sum(rec.updates, axis=0)
    assert np.max(np.abs(flatten(sums.update_sum) - float_sum)) <= N * 0.5 * step + 1e-6
    state = grid.contexts[grid.nodes[0]].state
    assert "fedseal.secagg.input" not in state and "fedseal.secagg.state" not in state


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_dropout_at_each_stage_still_gives_the_survivors_exact_sum(setup, monkeypatch, stage):
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    grid = QuickGrid(N, rec, drop={1: stage})
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    dropped = grid.nodes[1]
    contributed = stage in ("train.secagg_consistency", "train.secagg_unmask")
    included = [n for n in grid.nodes if n != dropped or contributed]
    assert not sums.abandoned
    _check_exact(cfg, grid, sums, rec.by_node, included)


def test_too_few_survivors_abandons_the_round(setup, monkeypatch):
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    stage = "train.secagg_share_keys"
    grid = QuickGrid(N, rec, drop={0: stage, 1: stage, 2: stage})
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert sums.update_sum is None and sums.mean_update() is None
    assert "threshold" in sums.abandoned


# --------------------------------------------- one malformed reply, one site
BAD = 3  # the misbehaving site's position


def _record_dropped(name):
    def change(node, reply, grid):
        if node == grid.nodes[BAD]:
            del reply.content[name]

    return change


def _field(key, fn):
    def change(node, reply, grid):
        if node == grid.nodes[BAD]:
            rec = reply.content[RECORD]
            rec[key] = fn(rec[key])

    return change


def _field_dropped(key):
    def change(node, reply, grid):
        if node == grid.nodes[BAD]:
            del reply.content[RECORD][key]

    return change


def _short_cts(data: bytes) -> bytes:
    table = unpack_table(data)
    width = len(next(iter(table.values()))) - 1
    return width.to_bytes(4, "big") + b"".join(
        node.to_bytes(8, "big") + ct[:-1] for node, ct in sorted(table.items())
    )


def _drop_one(data: bytes) -> bytes:
    table = unpack_table(data)
    first = sorted(table)[0]
    return data[:4] + b"".join(
        node.to_bytes(8, "big") + ct for node, ct in sorted(table.items()) if node != first
    )


def _dup_share(data: bytes) -> bytes:
    width = int.from_bytes(data[:4], "big")
    return data + data[4 : 4 + 8 + width]  # the first owner's entry twice


def _index0(data: bytes) -> bytes:
    shares = unpack_shares(data)
    owner = sorted(shares)[0]
    return pack_shares({**shares, owner: (0, shares[owner][1])})


def _extra_share(data: bytes) -> bytes:
    shares = unpack_shares(data)
    return pack_shares({**shares, 12345: next(iter(shares.values()))})


def _masked_as_config(node, reply, grid):
    if node == grid.nodes[BAD]:
        y = reply.content[MASKED][Y].numpy()
        del reply.content[MASKED]
        reply.content[MASKED] = ConfigRecord({Y: y.tobytes()})


def _copied_advert(node, reply, grid):
    if node == grid.nodes[BAD - 1]:
        grid.copied = reply.content[RECORD][ADVERT]
    elif node == grid.nodes[BAD]:
        reply.content[RECORD][ADVERT] = grid.copied


def _flip_last(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 1])


CASES = {
    "no secagg record": (TRAIN, _record_dropped(RECORD), "reply.missing"),
    "no metrics": ("train.secagg_masked_input", _record_dropped("metrics"), "reply.missing"),
    "31-byte key": (TRAIN, _field(ADVERT, lambda a: a[:80] + a[81:]), "bad keys"),
    "all-zero key": (TRAIN, _field(ADVERT, lambda a: a[:80] + bytes(32) + a[112:]), "bad keys"),
    "copy of another site's keys": (TRAIN, _copied_advert, "bad keys"),
    "short ciphertexts": ("train.secagg_share_keys", _field(CIPHERTEXTS, _short_cts), "bytes"),
    "missing receiver": ("train.secagg_share_keys", _field(CIPHERTEXTS, _drop_one), "addressed shares"),
    "shares as an integer": ("train.secagg_share_keys", _field(SHARES, lambda s: 5), "reply.form"),
    "masked as a ConfigRecord": ("train.secagg_masked_input", _masked_as_config, "reply.form"),
    "no complaints field": ("train.secagg_masked_input", _field_dropped(COMPLAINTS), "reply.missing"),
    "bad view signature": ("train.secagg_consistency", _field(SIGNATURE, _flip_last), "does not verify"),
    "extra share": ("train.secagg_unmask", _field(B_SHARES, _extra_share), "does not hold"),
    "duplicate share": ("train.secagg_unmask", _field(B_SHARES, _dup_share), "twice"),
    "index-0 share": ("train.secagg_unmask", _field(B_SHARES, _index0), "does not match"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_malformed_reply_drops_one_site(setup, monkeypatch, case):
    cfg, weights = setup
    stage, change, reason = CASES[case]
    rec = Recorder(monkeypatch)
    grid = QuickGrid(
        N, rec, mutate=lambda node, kind, reply: change(node, reply, grid) if kind == stage else None
    )
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert not sums.abandoned, sums.abandoned
    assert set(sums.failed) == {f"site-{BAD}"}, sums.failed
    assert reason in sums.failed[f"site-{BAD}"], sums.failed
    assert set(sums.deltas) == set(sums.epsilons)  # what a dropped site spent goes with it
    still_in = stage in ("train.secagg_consistency", "train.secagg_unmask")
    included = [n for n in grid.nodes if n != grid.nodes[BAD] or still_in]
    _check_exact(cfg, grid, sums, rec.by_node, included)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(stage=st.sampled_from(ALL_STAGES), who=st.integers(0, N - 1), data=st.data())
def test_any_mutated_record_field_drops_at_most_its_sender(setup, monkeypatch, stage, who, data):
    """Any field of any record of one site's reply, deleted, retyped, truncated, extended
    or flipped: the coordinator never raises, names only that site, keeps the sum exact."""
    cfg, weights = setup
    rec = Recorder(monkeypatch)

    def mutate(node, kind, reply):
        if kind != stage or node != grid.nodes[who]:
            return
        records = sorted(reply.content.keys())
        name = data.draw(st.sampled_from(records), label="record")
        record = reply.content[name]
        action = data.draw(st.sampled_from(["delete-record", "retype-record", "field"]))
        if action == "delete-record":
            del reply.content[name]
        elif action == "retype-record":
            del reply.content[name]
            reply.content[name] = (
                MetricRecord({"x": 1.0}) if isinstance(record, ConfigRecord) else ConfigRecord({"x": b"1"})
            )
        elif isinstance(record, ArrayRecord):
            arr = record[Y].numpy()
            record[Y] = Array(
                data.draw(st.sampled_from([arr[:-1], arr.astype(np.int64), arr.reshape(1, -1), arr[:0]]))
            )
        elif isinstance(record, ConfigRecord) and record:
            key = data.draw(st.sampled_from(sorted(record.keys())), label="field")
            value = record[key]
            how = data.draw(st.integers(0, 4), label="how")
            if how == 0 or not isinstance(value, bytes) or not value:
                del record[key]
            elif how == 1:
                record[key] = 7
            else:
                # Drawn independently of the length: a signature's DER length varies
                # between replays, and hypothesis needs the same draws to replay a case.
                pos = data.draw(st.integers(0, 2**16), label="pos") % len(value)
                record[key] = [
                    value[:pos],
                    value + b"\0",
                    value[:pos] + bytes([value[pos] ^ 0x41]) + value[pos + 1 :],
                ][how - 2]

    grid = QuickGrid(N, rec, mutate=mutate, seed=who)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert not sums.abandoned, sums.abandoned
    names = {f"site-{who}", f"node {grid.nodes[who]}"}  # without its status record: its node
    assert set(sums.failed) <= names, sums.failed
    node_of = {**{f"site-{i}": n for i, n in enumerate(grid.nodes)}, **{f"node {n}": n for n in grid.nodes}}
    contributors = [node_of[name] for name in sums.contributors]
    expected, expected_w = _expected(cfg, rec.by_node, contributors)
    np.testing.assert_array_equal(flatten(sums.update_sum), expected.astype(np.float32))
    assert sums.weight_sum == expected_w == len(contributors)


# ----------------------------------------------- sums no honest sites send
def test_a_garbled_masked_vector_abandons_the_round(setup, monkeypatch):
    cfg, weights = setup
    rec = Recorder(monkeypatch)

    def garble(node, kind, reply):
        if kind == "train.secagg_masked_input" and node == grid.nodes[0]:
            y = reply.content[MASKED][Y].numpy()
            reply.content[MASKED][Y] = Array(y ^ np.uint32(0x5A5A5A5A))

    grid = QuickGrid(N, rec, mutate=garble)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert sums.update_sum is None and "cannot produce" in sums.abandoned


def test_a_site_claiming_a_larger_weight_abandons_the_round(setup, monkeypatch):
    """A malicious encoder puts three times the largest weight in its weight slot."""
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    real = client_secagg.encode_update

    def greedy(u, w, n, clip):
        x = real(u, w, n, clip)
        x[-1] = np.uint32(3 * int(x[-1]))
        rec.pending.append(x)
        return x

    monkeypatch.setattr(client_secagg, "encode_update", greedy)
    grid = QuickGrid(N, rec)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert sums.update_sum is None and "weights sum" in sums.abandoned


def test_the_largest_updates_sites_can_send_keep_the_mean_within_the_clip(setup, monkeypatch):
    """Every site sends the largest update the encoding allows: the mean is the clip."""
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    real = client_secagg.encode_update
    monkeypatch.setattr(
        client_secagg,
        "encode_update",
        lambda u, w, n, clip: rec.pending.append(real(np.full_like(u, 1e6), w, n, clip)) or rec.pending[-1],
    )
    grid = QuickGrid(N, rec)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    mean = flatten(sums.mean_update())
    assert sums.clip == cfg.update_clip and np.max(np.abs(mean)) <= cfg.update_clip


# ------------------------------------------------- one unmask per (job, round)
def test_a_round_asked_again_is_not_unmasked_again(setup, monkeypatch):
    """A server that crashed after unmasking (or simply asks again) gets a refusal from
    every site for the same (job, round), even with fresh keys and a fresh update."""
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    grid = QuickGrid(N, rec)
    first = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert not first.abandoned
    again = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert again.update_sum is None and again.abandoned
    assert all("round.unmasked" in why for why in again.failed.values())
    assert len(again.failed) == N
    other_job = secure_round(grid, grid.nodes, _content(cfg, weights, job="job-2"), weights, cfg, RUN_ID, 1)
    assert not other_job.abandoned  # another job's round 1 is another round


def _deployed(tmp_path, cfg, n=N):
    """Node configs of deployed sites: the data file, a ledger, a key and a roster each."""
    lines, configs = [], []
    (tmp_path / "ledger-keys").mkdir()
    for i in range(n):
        private, public = generate_identity(f"d{i}")
        key = tmp_path / f"d{i}.key"
        key.write_bytes(private)
        lines.append(public)
        configs.append(
            {
                "data-path": str(simulation_site_file(cfg.out, i)),
                "site-name": f"site-{i}",
                "ledger-path": str(tmp_path / f"d{i}.ledger"),
                "ledger-key": str(tmp_path / "ledger-keys" / f"d{i}.key"),
                "identity-key": str(key),
                "peers": str(tmp_path / "peers.pub"),
            }
        )
    (tmp_path / "peers.pub").write_text("\n".join(lines) + "\n")
    return configs


def test_the_unmask_record_is_durable_beside_the_ledger(setup, monkeypatch, tmp_path):
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    configs = _deployed(tmp_path, cfg)
    grid = QuickGrid(N, rec, node_configs=configs)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights, 4, job="job-d"), weights, cfg, RUN_ID, 4)
    assert not sums.abandoned
    for i in range(N):
        record = json.loads((tmp_path / f"d{i}.ledger.secagg-unmasked.json").read_text())
        assert record["rounds"] == [["job-d", 4]]
    # a restarted site (fresh Context.state) still refuses: the record is on disk
    again = QuickGrid(N, rec, node_configs=configs)
    sums = secure_round(again, again.nodes, _content(cfg, weights, 4, job="job-d"), weights, cfg, RUN_ID, 4)
    assert sums.abandoned and all("round.unmasked" in v for v in sums.failed.values())
    # a corrupted record makes the site refuse rather than guess
    (tmp_path / "d0.ledger.secagg-unmasked.json").write_text("{not json")
    third = QuickGrid(N, rec, node_configs=configs)
    sums = secure_round(third, third.nodes, _content(cfg, weights, 5, job="job-d"), weights, cfg, RUN_ID, 5)
    assert "round.unmasked" in sums.failed["site-0"] and len(sums.contributors) == N


def test_no_answer_leaves_a_site_whose_record_cannot_be_written(setup, monkeypatch, tmp_path, caplog):
    """The record is written before the shares leave: if it cannot be, nothing leaves."""
    cfg, weights = setup
    rec = Recorder(monkeypatch)
    configs = _deployed(tmp_path, cfg)
    (tmp_path / "d1.ledger.secagg-unmasked.json").mkdir()  # not a writable file
    grid = QuickGrid(N, rec, node_configs=configs)
    with caplog.at_level("WARNING"):
        sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert "refused at secagg_unmask: round.unmasked" in sums.failed["site-1"]
    assert "Is a directory" not in sums.failed["site-1"]  # the why stays at the site...
    assert "Is a directory" in caplog.text  # ...in its own log
    assert not sums.abandoned  # the others finish without it


# ---------------------------------------------- the site's policy, first
@pytest.mark.parametrize(
    "policy,secagg,reason",
    [
        ({"min-cohort": N + 1}, {}, "policy.cohort: "),
        ({"min-secagg-k": 4}, {"secagg_k": 2}, "policy.secagg_k: "),
        ({"min-secagg-threshold": 4}, {"secagg_k": 2, "secagg_threshold": 2}, "policy.secagg_threshold: "),
        ({"min-secagg-threshold": 5}, {}, "asked 4, limit 5"),  # auto: k = 4, t = 4
        (
            {"max-colluders": 1, "min-cohort": 3},
            {"secagg_k": 2, "secagg_threshold": 2, "min_clients": N},
            "policy.colluders: ",
        ),  # 2t-k-1 = 1: one colluding site suffices
        (
            {"max-colluders": 3, "min-cohort": N},
            {"min_clients": N},
            "asked 4, limit 3",
        ),  # auto: k = 4, t = 4, 2t-k-1 = 3
        ({"max-update-clip": 0.5}, {}, "policy.update_clip: "),
        ({"peers": "/nonexistent/peers.pub"}, {}, "site.keys: "),
        (None, {}, "site.keys: "),
    ],
)
def test_a_round_below_the_sites_policy_is_refused_before_training(
    setup, monkeypatch, policy, secagg, reason
):
    cfg, weights = setup
    cfg = cfg.replace(**secagg)
    import fedseal.client.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("the site trained a round it refuses")

    monkeypatch.setattr(fedseal.client.trainer, "train_local", no_training)
    first = (
        {
            "data-path": str(simulation_site_file(cfg.out, 0)),
            "site-name": "site-0",
            "require-dp": cfg.dp,
            "min-cohort": 2,
            "max-colluders": 0,
            "allow-model": cfg.model,
            "labels": ",".join(cfg.labels),
        }
        if policy is None
        else {"partition-id": 0, **policy}
    )  # None: no key configured
    configs = [first, *({"partition-id": i} for i in range(1, N))]
    grid = LocalGrid(N, node_configs=configs, drop={i: TRAIN for i in range(1, N)})
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert reason in sums.refused.get("site-0", ""), sums.refused


def test_secure_aggregation_parameters_for_another_round_are_refused_before_training(setup, monkeypatch):
    """The training message says round 1, the SecAgg+ parameters round 2: the round
    decides the update's form and its bound (votes on 1, or update-clip), so a site
    refuses before it trains and spends anything."""
    cfg, weights = setup
    import fedseal.client.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("the site trained a round it refuses")

    monkeypatch.setattr(fedseal.client.trainer, "train_local", no_training)
    grid = LocalGrid(N)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights, server_round=1), weights, cfg, RUN_ID, 2)
    assert len(sums.refused) == N and not sums.contributors
    assert all(r.startswith("message.secagg: ") for r in sums.refused.values()), sums.refused


def test_a_node_list_padded_past_the_updates_grid_is_refused_before_training(setup, monkeypatch, caplog):
    """The server pads the node list with 20,000 invented ids, so that the update's fixed-point
    grid has no room for the sum of that many sites: every site refuses when it admits the
    round, before it trains or spends (found at encoding, it used to refuse after its spend)."""
    cfg, weights = setup
    cfg = cfg.replace(update_clip=1e5)
    import fedseal.client.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("the site trained a round it refuses")

    monkeypatch.setattr(fedseal.client.trainer, "train_local", no_training)

    class PaddedCohort(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for params in {
                id(p): p for p in (m.content[RECORD] for m in messages if m.metadata.message_type == TRAIN)
            }.values():
                params[NODES] = pack_ids(unpack_ids(params[NODES]) + list(range(1, 20_001)))
            return super().send_and_receive(messages, timeout=timeout)

    grid = PaddedCohort(N, node_configs=[{"partition-id": i, "max-update-clip": 1e5} for i in range(N)])
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert len(sums.refused) == N and not sums.contributors, sums.refused
    assert all(r.startswith("message.secagg: ") for r in sums.refused.values()), sums.refused
    details = [r.getMessage() for r in caplog.records if "this site refuses" in r.getMessage()]
    assert len(details) == N and all("cohort of 20005 sites leaves no fixed-point grid" in d for d in details)


# ------------------------------------------------------------- simulations
def test_simulations_give_every_site_a_key_and_the_roster(setup):
    cfg, _ = setup
    from fedseal.client.secagg import load_identity, load_roster

    fingerprints = set()
    for i in range(N):
        site = site_settings({"partition-id": i}, cfg)
        identity = load_identity(site.identity_key)
        assert oct(site.identity_key.stat().st_mode & 0o777) == "0o600"
        assert identity.fingerprint in load_roster(site.peers)
        fingerprints.add(identity.fingerprint)
    assert len(fingerprints) == N == len(load_roster(site.peers))


# ------------------------------------------- no spend for a round that cannot complete
def _deployed_dp(tmp_path, cfg, n=N):
    """Deployed sites with ledgers, each opened once (as the agent does at start)."""
    from fedseal.client.ledger import PrivacyLedger

    configs = _deployed(tmp_path, cfg, n)
    for c in configs:
        c.update(
            {
                "epsilon": cfg.epsilon,
                "delta": cfg.delta,
                "allow-model": cfg.model,
                "labels": ",".join(cfg.labels),
                "min-cohort": 2,
                "max-colluders": 0,
            }
        )
        PrivacyLedger.open(c["ledger-path"], c["site-name"], cfg.epsilon, cfg.delta, key_path=c["ledger-key"])
    return configs


def _ledgers(configs) -> list[bytes]:
    return [Path(c["ledger-path"]).read_bytes() for c in configs]


def test_a_round_too_small_to_complete_costs_no_site_any_budget(setup, tmp_path):
    """Three of five sites vanish before sharing keys: fewer than the threshold remain, the
    round is abandoned before the masked-input stage, and no site trained or spent."""
    cfg, weights = setup
    cfg = cfg.replace(dp=True, epsilon=8.0)
    configs = _deployed_dp(tmp_path, cfg)
    before = _ledgers(configs)
    grid = LocalGrid(N, node_configs=configs, drop={i: "train.secagg_share_keys" for i in (0, 1, 2)})
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert sums.abandoned and "train.secagg_masked_input" not in grid.sent
    assert _ledgers(configs) == before


def test_a_site_that_vanishes_after_training_costs_only_its_own_spend(setup, tmp_path):
    """Site 0 trains and then never answers: its spend is its own; the others complete."""
    from fedseal.client.ledger import PrivacyLedger

    cfg, weights = setup
    cfg = cfg.replace(dp=True, epsilon=8.0)
    configs = _deployed_dp(tmp_path, cfg)

    class LostReply(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            return [
                r
                for r in replies
                if not (
                    r.metadata.src_node_id == self.nodes[0]
                    and r.metadata.message_type == "train.secagg_masked_input"
                )
            ]

    grid = LostReply(N, node_configs=configs)
    sums = secure_round(grid, grid.nodes, _content(cfg, weights), weights, cfg, RUN_ID, 1)
    assert not sums.abandoned and len(sums.contributors) == N - 1
    spent = [
        PrivacyLedger.open(
            c["ledger-path"], c["site-name"], cfg.epsilon, cfg.delta, key_path=c["ledger-key"]
        ).epsilon_spent()
        for c in configs
    ]
    assert all(e > 0 for e in spent)  # site 0 trained too; the round completed without it
    assert "site-0" not in sums.epsilons and set(sums.epsilons) == set(sums.contributors)


def test_a_secure_round_asked_again_reuses_the_update_only_while_it_never_left(setup, tmp_path, monkeypatch):
    """Site 0 trains at the masked-input stage and dies before its masked vector leaves: the
    update it committed is kept (pending). Asked the same round again, it answers with that
    very update and spends nothing more; once it left, a third ask trains afresh."""
    from fedseal.client.ledger import PrivacyLedger

    cfg, weights = setup
    cfg = cfg.replace(dp=True, epsilon=8.0, rounds=3)  # budget for the others to retry round 1
    configs = _deployed_dp(tmp_path, cfg, n=3)
    rec = Recorder(monkeypatch)
    real = client_secagg.masked_input
    killed = []

    def dies_once(context, *args):
        out = real(context, *args)  # encoded and masked: the update existed
        if context.node_id == 2**63 + 7919 and not killed:
            killed.append(rec.updates[-1])
            raise RuntimeError("killed before the masked input left")
        return out

    monkeypatch.setattr(client_secagg, "masked_input", dies_once)

    def entries():
        c = configs[0]
        return PrivacyLedger.open(
            c["ledger-path"], c["site-name"], cfg.epsilon, cfg.delta, key_path=c["ledger-key"]
        ).entries

    def run() -> list[np.ndarray]:
        grid = LocalGrid(3, node_configs=configs)
        start = len(rec.updates)
        secure_round(grid, grid.nodes, _content(cfg, weights, 1, job="job-r"), weights, cfg, RUN_ID, 1)
        return rec.updates[start:]

    run()
    assert killed and len(entries()) == 1
    assert (tmp_path / "d0.ledger.pending").exists()
    again = run()
    same = [np.allclose(u, killed[0], rtol=1e-6, atol=1e-7) for u in again]  # kept as float32
    assert any(same) and len(entries()) == 1
    assert not (tmp_path / "d0.ledger.pending").exists()  # it left this time
    third = run()
    assert not any(np.allclose(u, killed[0], rtol=1e-6, atol=1e-7) for u in third)
    assert [e.steps for e in entries()][-1] > entries()[0].steps  # trained afresh, spent again
