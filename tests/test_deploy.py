"""Deployment end to end: real SuperLink, reverse proxy and SuperNode processes on 127.0.0.1.

The test provisions keys as the README says (the server's certificates with
``fedseal keys init``; each site its own key with ``fedseal keys site``; the
operator admits the public keys), starts ``fedseal server`` (Caddy on the public
port, the SuperLink on loopback with TLS, SuperNode authentication and a
database, plus the run) and ``fedseal client`` agents as separate processes,
each in its own process group, and stops every one of them at the end, pass or
fail. It plays an outsider, a curious operator and a crash in one deployment:
every deployment costs a SuperLink, three SuperNodes and their start-up, and
the suite has a time budget.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import tomli_w

from fedseal.common import synthetic
from fedseal.common.data import write_examples
from fedseal.common.processes import child_env, flwr_bin

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
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedseal.common.cli", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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
            pytest.fail(f"{name} did not finish within {timeout:.0f}s; its log:\n{self.output(name)[-4000:]}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
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


def _server_config(
    root: Path, name: str, port: int, local_port: int, tiny_bert: str, **federation: object
) -> Path:
    path = root / f"{name}.toml"
    path.write_text(
        f"""
[server]
address = "127.0.0.1:{port}"
local-port = {local_port}
keys = "keys"
state = "state"
sites = {json.dumps(list(SITES))}

[federation]
model = "{tiny_bert}"
finetune = "full"
eval = "eval.jsonl"
labels = ["negative", "positive"]
local_steps = 3
batch_size = 16
max_length = 16
accountant = "rdp"              # a real Opacus accountant, faster to calibrate than PRV
"""
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in federation.items()),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def federation(tmp_path, tiny_bert):
    """The server's certificates, each site's own key (and an intruder's), a peers roster,
    site data and server configs; the processes."""
    from fedseal.server.keys import add_site, create_site_key, init_keys, parse_hosts

    init_keys(tmp_path / "keys", parse_hosts(["localhost"]))
    roster = []
    for site in (*SITES, "intruder"):  # each makes its key at its own place
        _, pub = create_site_key(tmp_path / "at" / site, site)
        if site != "intruder":
            add_site(tmp_path / "keys", site, pub)  # only the public key reaches the operator
            roster.append(pub.read_text())
    (tmp_path / "peers.txt").write_text("".join(roster))
    for i, site in enumerate(SITES):
        write_examples(synthetic.synthetic_examples(96, seed=i), tmp_path / f"{site}.jsonl")
    write_examples(synthetic.synthetic_examples(64, seed=99), tmp_path / "eval.jsonl")
    port, local_port = _free_port(), _free_port()
    # Threshold 2 of 3 (k = 2), not the auto 3: the round must recover without the site
    # killed in round 2. 2t-k-1 = 1, so the sites run with --max-colluders 0 (_client_args).
    _server_config(
        tmp_path,
        "server",
        port,
        local_port,
        tiny_bert,
        rounds=2,
        clients=3,
        min_clients=2,
        secagg_threshold=2,
        timeout=120,
        out="out",
    )
    # A run asking for less than the sites allow (no DP), and what a curious operator
    # would ship instead of fedseal's ClientApp: both refused by the sites.
    # The no-DP run has rounds to spare: its server hosts the SuperLink, and exits when
    # the run ends, so it must outlive the foreign run the operator ships beside it.
    _server_config(
        tmp_path,
        "no-dp",
        port,
        local_port,
        tiny_bert,
        rounds=40,
        clients=2,
        min_clients=2,
        timeout=60,
        dp=False,
        out="out-no-dp",
    )
    (tmp_path / "ledgers").mkdir()
    (tmp_path / "secrets").mkdir()  # the ledger keys, apart from the ledgers
    (tmp_path / "logs").mkdir()
    procs = Procs(tmp_path / "logs")
    try:
        yield tmp_path, port, procs
    finally:
        procs.stop_all()


def _foreign_app(root: Path, tiny_bert: str) -> Path:
    """fedseal's app with a ClientApp and ServerApp that leave marker files when they run."""
    from fedseal.common.bundle import SERVER_APP
    from fedseal.common.config import FedConfig
    from fedseal.server.launch import write_app

    cfg = FedConfig(
        model=tiny_bert,
        finetune="full",
        eval=str(root / "eval.jsonl"),
        labels=("negative", "positive"),
        rounds=1,
        clients=2,
        min_clients=2,
        local_steps=3,
        batch_size=16,
        max_length=16,
        accountant="rdp",
        timeout=60,
        out=str(root / "out-foreign"),
    )
    app = write_app(root / "foreign", cfg)
    for side in ("client", "server"):
        with (app / side / "app.py").open("a", encoding="utf-8") as fh:
            fh.write(f"\nopen({str(root / f'{side}-code-ran')!r}, 'w').write('ran')\n")
    # The operator's ServerApp is the bundle's own server/app.py (top-level module `server`,
    # found in the bundle's folder), not the installed fedseal.server.app; the ClientApp
    # keeps fedseal's name, so only the sites' pinning stands between it and the data.
    project = app / "pyproject.toml"
    project.write_text(project.read_text().replace(f'"{SERVER_APP}"', '"server.app:app"'))
    return app


def _flwr(home: Path, *args: str, cwd: Path) -> dict:
    """The Flower CLI as a user on some machine would call it; its JSON answer."""
    done = subprocess.run(
        [flwr_bin("flwr"), *args, "--format", "json"],
        env=child_env(home),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    start = done.stdout.find("{")
    return json.loads(done.stdout[start:]) if start >= 0 else {"success": False, "error-message": done.stderr}


def _post(url: str, ca: Path, data: bytes = b"", headers: dict[str, str] | None = None) -> int:
    """HTTP status of a POST through the proxy (TLS verified against ``ca``)."""
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(
            request, context=ssl.create_default_context(cafile=str(ca)), timeout=10
        ) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _fleet_post(url: str, ca: Path, request, key_file: Path | None) -> int:
    """HTTP status of a Fleet protobuf call through the proxy, signed as Flower's SuperNode
    signs it (its own key, a fresh timestamp) when ``key_file`` is given."""
    from base64 import b64encode

    from cryptography.hazmat.primitives import serialization
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

    headers = {"Content-Type": PROTOBUF_MEDIA_TYPE, "Accept": PROTOBUF_MEDIA_TYPE}
    if key_file is not None:
        # OpenSSH format, as `fedseal keys site` writes it
        key = serialization.load_ssh_private_key(key_file.read_bytes(), None)
        stamp = now().isoformat()
        headers.update(
            {
                FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key_to_bytes(key.public_key())).decode(),
                TIMESTAMP_HEADER: stamp,
                FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(key, stamp.encode())).decode(),
            }
        )
    return _post(url, ca, request.SerializeToString(), headers)


def _listening(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _client_args(
    root: Path, port: int, site: str, model: str, *, key: str | None = None, wait: float = 90
) -> list[str]:
    name = key or site
    return [
        "client",
        "--server",
        f"localhost:{port}",
        "--ca",
        str(root / "keys" / "ca.pem"),
        "--key",
        str(root / "at" / name / f"{name}.key"),
        "--peers",
        str(root / "peers.txt"),
        "--data",
        str(root / f"{site}.jsonl"),
        "--ledger",
        str(root / "ledgers" / f"{name}.json"),
        "--ledger-key",
        str(root / "secrets" / f"{name}.key"),
        "--epsilon",
        str(EPSILON),
        "--device",
        "cpu",
        "--wait",
        str(wait),
        # long enough to ride out the server's restarts below, short enough to see the
        # agents stop on their own once the last server is gone
        "--linger",
        "30",
        # a round may go on with the two sites left after one dies, so its sum may be
        # one colluder's and one honest input: the sites accept no colluders, which
        # also lets them take the server's threshold 2 of 3 (2t-k-1 = 1)
        "--min-cohort",
        "2",
        "--max-colluders",
        "0",
        # the site declares its labels and the one model it runs (the tiny BERT)
        "--labels",
        "negative,positive",
        "--allow-model",
        model,
    ]


def _wait_for(predicate, timeout: float, what: str, procs: Procs, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if procs.procs[log].poll() is not None:
            pytest.fail(
                f"{log} exited ({procs.procs[log].returncode}) while waiting for {what}:\n"
                f"{procs.output(log)[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}; {log} log:\n{procs.output(log)[-4000:]}"
            )
        time.sleep(0.5)


def _checkpoint_round(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _ledger(root: Path, site: str) -> dict:
    return json.loads((root / "ledgers" / f"{site}.json").read_text())


def _entries(root: Path, site: str) -> list:
    try:
        return _ledger(root, site)["entries"]
    except (OSError, ValueError, KeyError):
        return []


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _outsider_is_locked_out(root: Path, port: int, procs: Procs, tiny_bert: str) -> None:
    """Holding ca.pem, the public address and a key of its own, an outsider can neither
    admit a node, submit or list runs, nor reach the Control or Runtime API; only the
    Fleet API is forwarded, and the SuperLink itself listens on loopback only."""
    ca = root / "keys" / "ca.pem"
    # A plaintext client cannot even complete a connection to the TLS port.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=5)
    channel.close()
    # The agent's pre-flight check names a wrong CA against the real TLS proxy.
    from fedseal.client.agent import AgentError, probe_server
    from fedseal.server.keys import init_keys, parse_hosts

    init_keys(root / "other-keys", parse_hosts(["localhost"]))
    with pytest.raises(AgentError, match="does not verify against --ca"):
        probe_server("localhost", port, root / "other-keys" / "ca.pem", wait=0)
    # The Flower CLI pointed at the public address, as in the attack that opened issue 10.
    home = root / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "public",
                    "public": {"address": f"localhost:{port}", "root-certificates": str(ca)},
                }
            }
        )
    )
    out = _flwr(
        home, "supernode", "register", str(root / "at" / "intruder" / "intruder.pub"), "public", cwd=home
    )
    assert out["success"] is False and "404" in out["error-message"], out
    out = _flwr(home, "run", str(_foreign_app(root, tiny_bert)), "public", cwd=home)
    assert out["success"] is False and "404" in out["error-message"], out
    assert _flwr(home, "ls", "public", cwd=home)["success"] is False
    time.sleep(2)  # had anything been submitted, its ServerApp would be starting now
    assert not (root / "server-code-ran").exists() and not (root / "client-code-ran").exists()
    # Control, Runtime and anything else stop at the proxy, path tricks included.
    base = f"https://localhost:{port}"
    for path in (
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/pull-messages",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/docs",
    ):
        assert _post(base + path, ca) == 404, path
    # The Fleet API does pass, and the SuperLink authenticates every call: the outsider's own
    # key signs correctly but admits it nowhere, and self-registration is off.
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.fleet_pb2 import PullMessagesRequest, RegisterNodeFleetRequest
    from flwr.proto.node_pb2 import Node
    from flwr.proto.run_pb2 import GetRunRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    intruder_key = root / "at" / "intruder" / "intruder.key"
    intruder_pub = serialization.load_ssh_private_key(intruder_key.read_bytes(), None).public_key()
    fleet = {
        "unsigned get-run": _fleet_post(
            base + "/v1/fleet/get-run", ca, GetRunRequest(node=Node(node_id=1), run_id=1), None
        ),
        "signed pull-messages": _fleet_post(
            base + "/v1/fleet/pull-messages", ca, PullMessagesRequest(node=Node(node_id=1)), intruder_key
        ),
        "signed register-node": _fleet_post(
            base + "/v1/fleet/register-node",
            ca,
            RegisterNodeFleetRequest(public_key=public_key_to_bytes(intruder_pub)),
            intruder_key,
        ),
    }
    assert fleet == {"unsigned get-run": 401, "signed pull-messages": 401, "signed register-node": 412}, (
        fleet
    )  # 412: registration only by the CLI
    local_port = int(
        next(
            line.split("=")[1]
            for line in (root / "server.toml").read_text().splitlines()
            if line.startswith("local-port")
        )
    )
    assert _listening(local_port) == {"127.0.0.1"}  # the SuperLink: loopback only
    # A key the server did not admit is refused.
    procs.start("intruder", *_client_args(root, port, "alpha", tiny_bert, key="intruder", wait=5))
    assert procs.wait("intruder", 120) == 3
    assert "refused this site's key" in procs.output("intruder")


def test_deployment_holds_against_outsiders_the_operator_and_crashes(federation, tiny_bert):
    """One deployment's life over TLS behind the reverse proxy:

    - an outsider is locked out (above);
    - two DP + SecAgg+ rounds, the server killed after round 1 and restarted (it resumes
      at round 2 under the same job), one site killed as round 2 starts (SecAgg+
      recovers without it, and it spends nothing on a round it never trained);
    - then the operator asks the two survivors for a run without DP, and ships a
      modified ClientApp from the server machine: both refused by the sites, named in
      the server's metrics, and none of the foreign code runs at a site.
    """
    root, port, procs = federation
    out = root / "out"
    procs.start("server-1", "server", "--config", str(root / "server.toml"))
    _wait_for(
        lambda: (root / "state" / "run.json").exists(), 120, "the run to be submitted", procs, "server-1"
    )
    _outsider_is_locked_out(root, port, procs, tiny_bert)

    for site in SITES:
        procs.start(site, *_client_args(root, port, site, tiny_bert))
    # Kill the server (proxy, SuperLink, ServerApp and all) once round 1 is checkpointed;
    # the restarted server resumes at round 2 under the same job.
    _wait_for(lambda: _checkpoint_round(out) >= 1, 300, "round 1 to complete", procs, "server-1")
    procs.kill("server-1")
    assert all(len(_entries(root, s)) == 1 for s in SITES)

    procs.start("server-2", "server", "--config", str(root / "server.toml"))
    # The agents reconnect on their own. Kill one as soon as round 2 starts: a secure
    # round trains only at its masked-input stage, so the victim vanishes before it
    # trains, and the round completes without it at no cost to it.
    victim, survivors = SITES[0], SITES[1:]
    _wait_for(
        lambda: "round 2/2: 3 site(s) training" in procs.output("server-2"),
        300,
        "round 2 to start",
        procs,
        "server-2",
    )
    procs.kill(victim)
    assert procs.wait("server-2", 600) == 0, procs.output("server-2")[-4000:]

    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["private"] and row["secagg"] and not row["abandoned"]
        assert all(0 < eps <= EPSILON for eps in row["epsilon"].values())
    assert sorted(rows[0]["contributors"]) == sorted(SITES)
    assert set(rows[0]["epsilon"]) == set(SITES)
    # SecAgg+ recovered the survivors' sum without the victim (k=2, threshold 2 of 3).
    assert sorted(rows[1]["contributors"]) == sorted(survivors)
    assert list(rows[1]["failed"]) == [victim]  # named, though the SuperLink answered for it
    assert set(rows[1]["epsilon"]) == set(survivors)
    job = json.loads((out / "checkpoint" / "job.json").read_text())["job_id"]
    for site in survivors:
        entries = _ledger(root, site)["entries"]
        # Each round counted once, across the restart, under one job.
        assert [(e["run"], e["round"]) for e in entries] == [(job, 1), (job, 2)]
        assert entries[1]["steps"] == 2 * entries[0]["steps"] == 6
        assert entries[1]["epsilon"] == pytest.approx(rows[1]["epsilon"][site])
        assert entries[1]["epsilon"] <= EPSILON
    # The victim spent round 1 only: it never trained the round it left.
    assert [(e["run"], e["round"]) for e in _ledger(root, victim)["entries"]] == [(job, 1)]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    logits = model(**tok(["a great film", "a dull film"], return_tensors="pt", padding=True)).logits
    assert tuple(logits.shape) == (2, 2)

    # The operator asks the survivors for a run without DP, and, from the server
    # machine (its own Flower CLI connection), ships a modified ClientApp.
    ledgers_before = {s: _ledger(root, s) for s in survivors}
    submitted = (root / "state" / "run.json").read_text()
    procs.start("server-3", "server", "--config", str(root / "no-dp.toml"))
    _wait_for(
        lambda: (root / "state" / "run.json").read_text() != submitted,
        120,
        "the run without DP to be submitted",
        procs,
        "server-3",
    )
    foreign = _flwr(root / "state" / "flwr", "run", str(root / "foreign"), "fedseal", cwd=root / "state")
    assert foreign["success"], foreign
    _wait_for(
        lambda: (
            len(_rows(root / "out-foreign" / "metrics.jsonl")) >= 1
            and len(_rows(root / "out-no-dp" / "metrics.jsonl")) >= 1
        ),
        300,
        "both runs to be refused",
        procs,
        "server-3",
    )
    procs.kill("server-3")
    no_dp = _rows(root / "out-no-dp" / "metrics.jsonl")[0]
    assert sorted(no_dp["refused"]) == sorted(survivors) and not no_dp["contributors"]
    assert all(why.startswith("policy.dp: ") and "setting dp" in why for why in no_dp["refused"].values()), (
        no_dp["refused"]
    )
    [foreign_row] = _rows(root / "out-foreign" / "metrics.jsonl")
    assert sorted(foreign_row["refused"]) == sorted(survivors)
    assert all(why.startswith("site.code: ") for why in foreign_row["refused"].values())
    assert (root / "server-code-ran").exists()  # the operator's own ServerApp did run...
    assert not (root / "client-code-ran").exists()  # ...but none of its ClientApp at a site
    for site in survivors:
        assert "refused run" in procs.output(site) and "client/app.py" in procs.output(site)
        assert _ledger(root, site) == ledgers_before[site]  # nothing trained, nothing spent
    # The last server is gone: each agent says so once and stops on its own, exit 0.
    for site in survivors:
        assert procs.wait(site, 240) == 0, procs.output(site)[-3000:]
        said = procs.output(site)
        assert "has been gone for" in said and "Connection attempt failed" not in said
        assert "\x1b[" not in said
