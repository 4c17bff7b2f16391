"""Deployment end to end: real SuperLink and SuperNode processes on 127.0.0.1.

Each test provisions keys with ``fedseal keys init``, starts ``fedseal server``
(SuperLink with TLS, SuperNode authentication and a database, plus the run) and
``fedseal client`` agents as separate processes, each in its own process group,
and stops every one of them at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from common import synthetic
from common.data import write_examples

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SITES = ("alpha", "beta", "gamma")
EPSILON = 8.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Procs:
    """Every process a test starts, each in its own session; all killed at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=ROOT,
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the agent or server and all it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout:.0f}s; its log:\n"
                        f"{self.output(name)[-4000:]}")

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, too
            except ProcessLookupError:
                pass


@pytest.fixture
def federation(tmp_path, tiny_bert):
    """Keys for three sites and an intruder, site data, and a server config; the processes."""
    from server.keys import init_keys, parse_hosts

    init_keys(tmp_path / "keys", [*SITES, "intruder"], parse_hosts(["localhost"]))
    for i, site in enumerate(SITES):
        write_examples(synthetic.synthetic_examples(96, seed=i), tmp_path / f"{site}.jsonl")
    write_examples(synthetic.synthetic_examples(64, seed=99), tmp_path / "eval.jsonl")
    port = _free_port()
    (tmp_path / "server.toml").write_text(f"""
[server]
address = "127.0.0.1:{port}"
keys = "keys"
state = "state"
sites = {json.dumps(list(SITES))}

[federation]
model = "{tiny_bert}"
finetune = "full"
eval = "eval.jsonl"
labels = ["negative", "positive"]
rounds = 2
clients = 3
min_clients = 2
local_steps = 3
batch_size = 16
max_length = 16
timeout = 120
accountant = "rdp"              # a real Opacus accountant, faster to calibrate than PRV
out = "out"
""", encoding="utf-8")
    (tmp_path / "ledgers").mkdir()
    (tmp_path / "logs").mkdir()
    procs = Procs(tmp_path / "logs")
    try:
        yield tmp_path, port, procs
    finally:
        procs.stop_all()


def _client_args(root: Path, port: int, site: str, *, key: str | None = None,
                 wait: float = 90) -> list[str]:
    return ["client", "--server", f"localhost:{port}", "--ca", str(root / "keys" / "ca.pem"),
            "--key", str(root / "keys" / "sites" / f"{key or site}.key"),
            "--data", str(root / f"{site}.jsonl"),
            "--ledger", str(root / "ledgers" / f"{key or site}.json"),
            "--epsilon", str(EPSILON), "--device", "cpu", "--wait", str(wait)]


def _wait_for(predicate, timeout: float, what: str, procs: Procs, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if procs.procs[log].poll() is not None:
            pytest.fail(f"{log} exited ({procs.procs[log].returncode}) while waiting for {what}:\n"
                        f"{procs.output(log)[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; {log} log:\n"
                        f"{procs.output(log)[-4000:]}")
        time.sleep(0.5)


def _checkpoint_round(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _ledger(root: Path, site: str) -> dict:
    return json.loads((root / "ledgers" / f"{site}.json").read_text())


def test_tls_federation_survives_a_server_restart_and_a_dead_site(federation):
    """One deployment's life: two DP + SecAgg+ rounds over TLS, the server killed after
    round 1 and resumed, and one site killed in round 2 (SecAgg+ recovers without it).

    One scenario rather than two tests: every deployment costs a SuperLink, three
    SuperNodes and a round of start-up, and the suite has a time budget.
    """
    root, port, procs = federation
    out = root / "out"
    procs.start("server-1", "server", "--config", str(root / "server.toml"))
    _wait_for(lambda: (root / "state" / "run.json").exists(), 120, "the run to be submitted",
              procs, "server-1")

    # A plaintext client cannot even complete a connection to the TLS port.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=5)
    channel.close()
    # The agent's pre-flight check names a wrong CA against the real TLS server.
    from client.agent import AgentError, probe_server
    from server.keys import init_keys, parse_hosts

    init_keys(root / "other-keys", [], parse_hosts(["localhost"]))
    with pytest.raises(AgentError, match="does not verify against --ca"):
        probe_server("localhost", port, root / "other-keys" / "ca.pem", wait=0)
    # A key the server did not admit is refused.
    procs.start("intruder", *_client_args(root, port, "alpha", key="intruder", wait=5))
    assert procs.wait("intruder", 120) == 3
    assert "refused this site's key" in procs.output("intruder")

    for site in SITES:
        procs.start(site, *_client_args(root, port, site))
    _wait_for(lambda: _checkpoint_round(out) >= 1, 300, "round 1", procs, "server-1")
    procs.kill("server-1")  # SuperLink, ServerApp and all, mid-run
    assert _checkpoint_round(out) == 1

    procs.start("server-2", "server", "--config", str(root / "server.toml"))
    # The agents reconnect on their own. Kill one once it has trained round 2 and
    # recorded the spend, after its reply (public keys) has had time to upload: a node
    # killed in the middle of an upload leaves a half-stored reply that Flower 1.41
    # only gives up on at the timeout.
    victim, survivors = SITES[0], SITES[1:]
    _wait_for(lambda: len(_ledger(root, victim)["entries"]) >= 2, 300,
              f"{victim} to train round 2", procs, "server-2")
    time.sleep(5)
    procs.kill(victim)  # gone before share-keys: the SuperLink answers for it within ~60 s
    assert procs.wait("server-2", 600) == 0, procs.output("server-2")[-4000:]
    assert "resuming after round 1" in procs.output("server-2")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["private"] and row["secagg"] and not row["abandoned"]
        assert all(0 < eps <= EPSILON for eps in row["epsilon"].values())
    assert sorted(rows[0]["contributors"]) == sorted(SITES)
    assert set(rows[0]["epsilon"]) == set(SITES)
    # SecAgg+ recovered the survivors' sum without the victim (k=2, threshold 2 of 3).
    assert sorted(rows[1]["contributors"]) == sorted(survivors)
    assert list(rows[1]["failed"]) == [victim]  # named, though the SuperLink answered for it
    job = json.loads((out / "checkpoint" / "job.json").read_text())["job_id"]
    for site in SITES:
        entries = _ledger(root, site)["entries"]
        # Each round counted exactly once, across the restart, under one job; the
        # victim's round 2 too: it trained and reported before dying.
        assert [(e["run"], e["round"]) for e in entries] == [(job, 1), (job, 2)]
        assert entries[1]["steps"] == 2 * entries[0]["steps"] == 6
        assert entries[1]["epsilon"] == pytest.approx(rows[1]["epsilon"][site])
        assert entries[1]["epsilon"] <= EPSILON
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    logits = model(**tok(["a great film", "a dull film"], return_tensors="pt", padding=True)).logits
    assert tuple(logits.shape) == (2, 2)
