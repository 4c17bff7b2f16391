"""Many simulated sites: what a process keeps between messages, stages that wait while sites
answer and name those that never do, and Flower's engine at scale."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from queue import Queue

import pytest
import torch

from fedseal.client import cache
from fedseal.common import egress
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples
from fedseal.common.features import encoder_digest
from fedseal.common.model import load_trainable, trainable_state
from fedseal.server.aggregate import TIMED_OUT, RoundSums, is_timed_out, send, triage
from fedseal.server.identity import SiteNames


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


# -- what a process keeps -----------------------------------------------------------------------


def test_probe_copies_share_the_frozen_encoder_and_own_their_head(tiny_bert):
    cfg = FedConfig(model=tiny_bert, labels=("negative", "positive"))
    first, tokenizer = cache.model_and_tokenizer(cfg)
    state = trainable_state(first)
    load_trainable(first, {k: torch.full_like(v, 3.0) for k, v in state.items()})
    second, again = cache.model_and_tokenizer(cfg)
    assert again is tokenizer
    assert second.backbone is first.backbone  # built once, never trained
    # the first site's trained head never reaches the next site's copy
    assert all(torch.equal(v, state[k]) for k, v in trainable_state(second).items())
    assert not any(torch.equal(v, torch.full_like(v, 3.0)) for v in trainable_state(second).values())


def test_an_encoder_changed_in_place_is_built_afresh(tiny_bert, caplog):
    cfg = FedConfig(model=tiny_bert, labels=("negative", "positive"))
    model, _ = cache.model_and_tokenizer(cfg)
    pristine = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1.0)  # what no site may do to a shared encoder
    with caplog.at_level(logging.WARNING, logger="fedseal.client.cache"):
        fresh, _ = cache.model_and_tokenizer(cfg)
    assert "changed in place" in caplog.text
    assert fresh.backbone is not model.backbone
    assert all(torch.equal(v, pristine[k]) for k, v in fresh.backbone.state_dict().items())


def test_lora_copies_share_nothing(tiny_bert):
    cfg = FedConfig(model=tiny_bert, finetune="lora", labels=("negative", "positive"))
    first, _ = cache.model_and_tokenizer(cfg)
    second, _ = cache.model_and_tokenizer(cfg)
    shared = {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    assert not shared  # DP-SGD trains the encoder's adapters and Opacus hooks the module


def test_tokenised_data_is_keyed_by_the_examples_themselves(tiny_bert):
    from fedseal.common.batches import encode

    cfg = FedConfig(model=tiny_bert, labels=("negative", "positive"))
    _, tokenizer = cache.model_and_tokenizer(cfg)
    mine = Examples(["a great movie", "a dull film"], [1, 0], cfg.labels, "site-0.jsonl")
    theirs = Examples(["a great movie", "a dull film!"], [1, 0], cfg.labels, "site-1.jsonl")
    relabelled = Examples(["a great movie", "a dull film"], [0, 0], cfg.labels, "site-2.jsonl")
    data = cache.encoded(tokenizer, mine, 16)
    assert cache.encoded(tokenizer, mine, 16) is data
    for other in (theirs, relabelled):
        got = cache.encoded(tokenizer, other, 16)
        expected = encode(tokenizer, other, 16)
        assert got is not data
        assert all(torch.equal(a, b) for a, b in zip(got.tensors, expected.tensors))
    assert cache.encoded(tokenizer, mine, 8).tensors[0].shape[1] == 8


def test_parsed_files_are_keyed_by_their_bytes():
    calls = []

    def parse(data: bytes) -> list[bytes]:
        calls.append(data)
        return [data]

    one, two = cache.parsed(b"key of site 0", parse), cache.parsed(b"key of site 1", parse)
    assert one == [b"key of site 0"] and two == [b"key of site 1"]
    assert cache.parsed(b"key of site 0", parse) is one
    assert calls == [b"key of site 0", b"key of site 1"]


def test_the_encoder_digest_follows_in_place_changes(tiny_bert):
    cfg = FedConfig(model=tiny_bert, labels=("negative", "positive"))
    model, _ = cache.model_and_tokenizer(cfg)
    before = encoder_digest(model)
    assert encoder_digest(model) == before
    with torch.no_grad():
        next(model.backbone.parameters()).mul_(2.0)
    assert encoder_digest(model) != before


# -- stages that wait while sites answer --------------------------------------------------------


class TricklingGrid:
    """A Flower-like grid (push, then pull) whose nodes answer one by one, ``gap`` seconds
    apart; ``silent`` nodes never answer."""

    def __init__(self, nodes: list[int], gap: float, silent: set[int]) -> None:
        self.nodes, self.gap, self.silent = nodes, gap, silent
        self.pushed: dict[str, object] = {}
        self.started = 0.0

    def push_messages(self, messages):
        from uuid import uuid4

        self.started = time.monotonic()
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.pushed[msg.metadata.message_id] = msg
        return list(self.pushed)

    def pull_messages(self, ids):
        from flwr.app import ConfigRecord, Message, RecordDict

        due = int((time.monotonic() - self.started) / self.gap)
        answering = [m for m in self.pushed.values() if m.metadata.dst_node_id not in self.silent]
        out = []
        for msg in answering[:due]:
            if msg.metadata.message_id in ids:
                out.append(Message(RecordDict({"status": ConfigRecord({"site": "x"})}), reply_to=msg))
        return out


def _identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 1


def test_a_stage_waits_while_sites_keep_answering_and_names_the_silent_one(caplog, monkeypatch):
    from flwr.app import RecordDict

    _identity()
    nodes = [11, 12, 13, 14, 15]
    grid = TricklingGrid(nodes, gap=0.15, silent={13})
    monkeypatch.setattr("fedseal.server.aggregate.PROGRESS_SECONDS", 0.2)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        replies, _ = send(grid, nodes, RecordDict(), "train", timeout=0.4)
    took = time.monotonic() - started
    # four answers 0.15 s apart: longer than the timeout in all, never that long between two
    assert took > 0.4 + 0.15 * 3
    assert sorted(r.metadata.src_node_id for r in replies) == nodes
    late = [r for r in replies if is_timed_out(r)]
    assert [r.metadata.src_node_id for r in late] == [13]
    assert late[0].error.code == TIMED_OUT and "raise --timeout" in late[0].error.reason
    assert "did not answer train within 0.4s" in caplog.text
    assert re.search(r"train: [1-4] of 5 site\(s\) answered after", caplog.text)  # while waiting
    sums = RoundSums()
    with caplog.at_level(logging.WARNING):
        triage(replies, sums, egress.TRAINING, SiteNames())
    assert "site node 13 failed this round: reply.timeout" in caplog.text  # named as recorded
    assert sums.timed_out == ["node 13"] and "timed out" in sums.failed["node 13"]
    assert sums.failed["node 13"].startswith(egress.REPLY_TIMEOUT)


def _vanishing_run(tmp_path, tiny_bert, stage: str, secagg: bool = True) -> tuple[list, str]:
    from fedseal.common.data import write_examples
    from fedseal.common.synthetic import synthetic_examples
    from fedseal.server.app import run_federation
    from fedseal.simulations.simulate import prepare_sites
    from simulations.bench.local_grid import RUN_ID, LocalGrid

    train = write_examples(synthetic_examples(200, seed=1), tmp_path / "train.jsonl")
    held_out = write_examples(synthetic_examples(60, seed=2), tmp_path / "eval.jsonl")
    cfg = prepare_sites(
        FedConfig(
            model=tiny_bert,
            clients=5,
            min_clients=2,
            rounds=2,
            train=str(train),
            eval=str(held_out),
            max_length=16,
            accountant="rdp",
            secagg=secagg,
            out=str(tmp_path / "out"),
        )
    )
    run_federation(LocalGrid(5, drop={3: stage}), cfg, run_id=RUN_ID)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, (out / "report.html").read_text(encoding="utf-8")


SILENT = str(2**63 + 7919 * 4)  # LocalGrid's fourth node, which vanishes


def test_a_site_that_vanishes_before_training_is_named_timed_out_everywhere(tiny_bert, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedseal"):
        rows, page = _vanishing_run(tmp_path, tiny_bert, "train")
    node = f"node {SILENT}"  # it never said its name
    for row in rows:
        assert row["timed_out"] == [node]
        assert "timed out" in row["failed"][node] and "--timeout" in row["failed"][node]
        assert len(row["contributors"]) == 4 and not row["abandoned"]
    assert node in caplog.text and "raise --timeout" in caplog.text
    assert "1 timed out" in caplog.text  # the progress line
    assert "Sites timed out" in page and node in page


def test_a_site_that_vanishes_mid_protocol_is_named_by_its_site_name(tiny_bert, tmp_path):
    rows, page = _vanishing_run(tmp_path, tiny_bert, "train.secagg_share_keys")
    first, second = rows
    assert first["timed_out"] == ["site-3"]  # it answered train with its name, then vanished
    assert first["failed"]["site-3"].startswith(
        f"dropped at secagg_share_keys: {egress.REPLY_TIMEOUT}: timed out"
    )
    assert second["timed_out"] == ["site-3"]  # the name it gave in round 1 holds for the run
    for row in rows:
        assert len(row["contributors"]) == 4 and not row["abandoned"]
    assert "site-3" in page


def test_a_plain_round_names_the_silent_site_too(tiny_bert, tmp_path):
    rows, _ = _vanishing_run(tmp_path, tiny_bert, "train", secagg=False)
    assert all(len(row["timed_out"]) == 1 and len(row["contributors"]) == 4 for row in rows)


# -- Flower's engine ----------------------------------------------------------------------------


def _link_state(nodes: int):
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    _identity()
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=4242)
    run.primary_task_id, run.federation_id = 5, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[5] = Task(task_id=5, run_id=run.run_id)
    mapping = _register_nodes(nodes, factory)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return state, grid, mapping


def test_the_indexed_sweep_delivers_every_message_once_in_node_order():
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedseal.simulations.engine import add_messages_to_queue

    state, grid, mapping = _link_state(6)
    nodes = list(mapping)
    pushed = list(
        grid.push_messages(
            [
                Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=node, message_type="train")
                for i, node in enumerate(nodes[1:4] * 2)
            ]
        )
    )  # two messages for three of six nodes
    queue: Queue = Queue()
    stop = threading.Event()
    sweeper = threading.Thread(target=add_messages_to_queue, args=(state, queue, mapping, stop))
    sweeper.start()
    deadline = time.monotonic() + 10
    got = []
    while len(got) < len(pushed) and time.monotonic() < deadline:
        if not queue.empty():
            got.append(queue.get())
        time.sleep(0.01)
    stop.set()
    sweeper.join()
    assert sorted(m.metadata.message_id for m in got) == sorted(pushed)
    assert queue.empty()
    # the first sweep hands each node one message, in the engine's node order
    assert [m.metadata.dst_node_id for m in got[:3]] == nodes[1:4]
    assert [m.content["c"]["i"] for m in got] == [0, 1, 2, 3, 4, 5]


def test_the_indexed_sweep_is_flowers_only_under_the_release_it_was_written_for(monkeypatch):
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    from fedseal.simulations import engine

    original = vce_api.add_messages_to_queue
    with engine.indexed_sweep() as replaced:
        assert replaced and vce_api.add_messages_to_queue is engine.add_messages_to_queue
    assert vce_api.add_messages_to_queue is original
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with engine.indexed_sweep() as replaced:
        assert not replaced and vce_api.add_messages_to_queue is original


def test_backend_config_joins_a_cluster_or_sizes_a_local_one():
    from fedseal.simulations.engine import backend_config

    local = backend_config()
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert local["init_args"]["num_cpus"] >= 1
    joined = backend_config(ray_address="127.0.0.1:6379", cpus_per_site=2)
    assert joined["init_args"]["address"] == "127.0.0.1:6379"
    assert "num_cpus" not in joined["init_args"] and "num_gpus" not in joined["init_args"]
    assert joined["client_resources"]["num_cpus"] == 2


def test_cpus_per_site_must_be_positive(capsys):
    from fedseal.simulations.simulate import main

    with pytest.raises(SystemExit) as stop:
        main(["--cpus-per-site", "0", "--out", "unused"])
    assert stop.value.code == 2
    assert "--cpus-per-site: must be a positive number of CPUs, got '0'" in capsys.readouterr().err


# -- an existing Ray cluster ----------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ray_head():
    """A Ray head on 127.0.0.1 in its own process group (stopped by killing that group only)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    port = _free_port()
    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="fsray"))
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            str(temp),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_simulate_joins_a_running_ray_cluster(tiny_bert, tmp_path, ray_head, monkeypatch):
    """``--ray-address``: the virtual sites run as actors of the cluster, not of a Ray the
    command starts itself."""
    import os
    import subprocess
    import sys

    import ray

    from fedseal.common.data import write_examples
    from fedseal.common.synthetic import synthetic_examples

    address, temp = ray_head
    train = write_examples(synthetic_examples(120, seed=1), tmp_path / "train.jsonl")
    held_out = write_examples(synthetic_examples(40, seed=2), tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fedseal.common.cli",
        "simulate",
        "--ray-address",
        address,
        "--model",
        tiny_bert,
        "--clients",
        "3",
        "--rounds",
        "2",
        "--max-length",
        "16",
        "--accountant",
        "rdp",
        "--train",
        str(train),
        "--eval",
        str(held_out),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["contributors"]) for r in rows] == [3, 3] and not any(r["failed"] for r in rows)
    # The cluster ran the command as a job, and the sites' ClientApp actors in its workers.
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's coming default
    ray.init(address=address, logging_level="ERROR")
    try:
        from ray._private import state

        jobs = [job for job in state.jobs() if "--ray-address" in job.get("Entrypoint", "")]
    finally:
        ray.shutdown()
    assert len(jobs) == 1 and jobs[0]["IsDead"], jobs
    actors = [
        path.read_text(errors="replace") for path in (temp / "session_latest" / "logs").glob("worker-*.out")
    ]
    assert sum(":actor_name:ClientAppActor" in text for text in actors) == 2  # 2 CPUs, 1 each


def test_the_console_names_timed_out_sites_and_abandoned_rounds(tmp_path, capsys):
    from fedseal.simulations.simulate import run_problems

    cfg = FedConfig(timeout=30, out=str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"

    def write(*rows):
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    stats = {"round": 1, "abandoned": "", "timed_out": []}
    late = {"round": 2, "abandoned": "", "timed_out": ["site-7", "1234"]}
    write(stats, late)
    run_problems(cfg, metrics)
    said = capsys.readouterr().out
    assert "2 site(s) timed out (no answer within 30s" in said and "1234, site-7;" in said
    assert "raise --timeout" in said
    lost = {"round": 2, "abandoned": "too few sites", "timed_out": ["1234"]}
    write(stats, lost, {**lost, "round": 3})
    run_problems(cfg, metrics)
    assert "round 3 was abandoned, the model unchanged by it: too few sites" in capsys.readouterr().out


@pytest.mark.parametrize("n, k", [(5, 4), (12, 4), (40, 12), (9, 8)])
def test_a_rounds_graph_is_the_ring_of_neighbours(n, k):
    from fedseal.common.secagg import RoundContext, neighbours

    ids = [2**63 + 7919 * (i + 1) for i in range(n)][::-1]
    ctx = RoundContext(7, 1, ids, k, k // 2 + 2, b"\x01" * 32)
    assert set(ctx.graph) == set(ids) and len(ctx.graph) == n
    assert {node: ctx.graph[node] for node in ids} == neighbours(ids, k)
    assert 2**63 not in ctx.graph


def test_a_sites_secagg_state_is_handed_on_once_and_else_rebuilt_from_its_record(tmp_path):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedseal.client import secagg as site_secagg
    from fedseal.client.site import simulation_key_file, simulation_roster_file
    from fedseal.common.secagg import ClientState, RoundContext
    from fedseal.simulations.simulate import write_site_keys

    write_site_keys(tmp_path, 3)
    key, peers = simulation_key_file(tmp_path, 0), simulation_roster_file(tmp_path)

    def context(node: int, state: RecordDict) -> Context:
        state[site_secagg.SITE] = ConfigRecord(
            {"job": "j", "identity-key": str(key), "peers": str(peers), "record": ""}
        )
        return Context(run_id=7, node_id=node, node_config={}, state=state, run_config={})

    mine = context(11, RecordDict())
    state = ClientState(
        11,
        RoundContext(7, 1, [11, 12, 13], 2, 2, b"\x01" * 32),
        identity=site_secagg.load_identity(key),
        roster=site_secagg.load_roster(peers),
    )
    state.advertise_keys()
    site_secagg._save(mine, state)
    assert site_secagg._load(mine) is state  # the next stage gets the live object ...
    rebuilt = site_secagg._load(mine)  # ... once: a second load rebuilds it from the record
    assert rebuilt is not state and rebuilt.export_state() == state.export_state()
    site_secagg._save(mine, state)
    assert site_secagg._load(context(12, mine.state)) is not state  # another node's record


def test_simulated_sites_share_their_computed_features_through_the_sites_folder(tmp_path):
    from fedseal.client.site import feature_cache, site_settings

    cfg = FedConfig(out=str(tmp_path / "out"))
    simulated = site_settings({"partition-id": 4}, cfg)
    assert feature_cache(simulated) == tmp_path / "out" / "sites" / "site-4.features"
    deployed = site_settings({"data-path": str(tmp_path / "mine.csv")}, cfg)
    assert feature_cache(deployed) is None  # no state folder: memory only, as before
    ledgered = site_settings(
        {
            "data-path": str(tmp_path / "mine.csv"),
            "ledger-path": str(tmp_path / "state" / "ledger.json"),
            "ledger-key": str(tmp_path / "ledger.key"),
        },
        cfg,
    )
    assert feature_cache(ledgered) == tmp_path / "state" / "feature-cache"
