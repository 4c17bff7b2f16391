"""``fedseal server``'s config file and ``fedseal client``'s checks, without processes."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedseal.client.agent import (
    AgentError,
    check_files,
    check_peers,
    node_config,
    probe_server,
    write_node_config,
)
from fedseal.client.site import SitePolicy, reply_hold
from fedseal.common.config import ConfigError
from fedseal.server.launch import LaunchError, ServerSettings, check_keys, load_server_config, write_app


def _config(tmp_path, text: str):
    (tmp_path / "eval.jsonl").write_text('{"sentence": "x", "label": "a"}\n')
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_server_config_resolves_paths_and_builds_the_run(tmp_path):
    path = _config(
        tmp_path,
        '[server]\naddress = "0.0.0.0:9100"\n[federation]\n'
        'eval = "eval.jsonl"\nrounds = 4\nout = "runs/a"\n'
        'tensorboard = "runs/tb"\n',
    )
    settings, cfg = load_server_config(path)
    assert settings.port == 9100 and settings.keys == tmp_path / "keys"
    # The SuperLink itself (Control, Runtime API) only ever on loopback; the proxy public.
    assert settings.admin_address == "127.0.0.1:9101" and settings.probe_address == "127.0.0.1:9100"
    assert settings.state == tmp_path / "fedseal-server" and not settings.insecure
    assert cfg.rounds == 4 and cfg.eval == str(tmp_path / "eval.jsonl")
    assert cfg.out == str(tmp_path / "runs" / "a")
    assert cfg.tensorboard == str(tmp_path / "runs" / "tb")  # beside the config, not the cwd
    app = write_app(tmp_path / "app", cfg)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"]["rounds"] == 4
    assert project["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedseal.server.app:app"
    assert "federations" not in project["tool"]["flwr"]
    assert (app / "client" / "app.py").is_file() and not list(app.rglob("__pycache__"))


@pytest.mark.parametrize(
    "text, match",
    [
        ('[server]\nadress = "0.0.0.0:1"\n[federation]\neval = "eval.jsonl"\n', "did you mean 'address'"),
        ('[sever]\n[federation]\neval = "eval.jsonl"\n', "did you mean 'server'"),
        ('[federation]\neval = "eval.jsonl"\nrounds = 3\nepsillon = 2\n', "did you mean 'epsilon'"),
        ("[federation]\nrounds = 3\n", "set eval"),
        ('[federation]\neval = "missing.tsv"\n', "does not exist"),
        ('[server]\naddress = "nohost"\n[federation]\neval = "eval.jsonl"\n', "HOST:PORT"),
        ('[server]\nsites = "alpha"\n[federation]\neval = "eval.jsonl"\n', "list of site names"),
        (
            '[server]\naddress = "0.0.0.0:9100"\nlocal-port = 9100\n[federation]\neval = "eval.jsonl"\n',
            "must differ",
        ),
        ("[federation\n", "not valid TOML"),
    ],
)
def test_server_config_errors_say_what_to_change(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_server_config(_config(tmp_path, text))


def test_keys_folder_problems_are_named(tmp_path):
    from fedseal.server.keys import add_site, create_site_key, init_keys, parse_hosts

    with pytest.raises(LaunchError, match="fedseal keys init"):
        check_keys(ServerSettings(keys=tmp_path / "nokeys"))
    init_keys(tmp_path / "keys", parse_hosts(["fl.example.org"]))
    add_site(tmp_path / "keys", "alpha", create_site_key(tmp_path / "site", "alpha")[1])
    assert [s for s, _ in check_keys(ServerSettings(keys=tmp_path / "keys"))] == ["alpha"]
    with pytest.raises(LaunchError, match=r"no public key for site\(s\) \['beta'\].*add-site"):
        check_keys(ServerSettings(keys=tmp_path / "keys", sites=("alpha", "beta")))
    with pytest.raises(LaunchError, match="covers"):
        check_keys(ServerSettings(address="10.9.9.9:9093", keys=tmp_path / "keys"))


def _ca(path, *, days_left: int):
    """A self-signed CA certificate written to ``path``, ``days_left`` from expiry; (key, name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=days_left))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, name


def test_agent_checks_name_the_bad_input(tmp_path):
    from fedseal.server.keys import create_site_key, init_keys, parse_hosts

    init_keys(tmp_path / "keys", parse_hosts(["localhost"]))
    key, pub = create_site_key(tmp_path / "site", "alpha")
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nx,a\n")
    ca = tmp_path / "keys" / "ca.pem"
    check_files(data, key, ca)
    with pytest.raises(AgentError, match="--data .* does not exist"):
        check_files(tmp_path / "none.csv", key, ca)
    with pytest.raises(AgentError, match="not the .pub file"):
        check_files(data, pub, ca)
    (tmp_path / "peers.txt").write_text(f"# fellow sites\n{pub.read_text()}\n")
    assert check_peers(tmp_path / "peers.txt") == 1
    (tmp_path / "bad-peers.txt").write_text(pub.read_text() + "not a key\n")
    with pytest.raises(AgentError, match="line 2 is not an OpenSSH public key"):
        check_peers(tmp_path / "bad-peers.txt")
    with pytest.raises(AgentError, match="expired"):
        _ca(tmp_path / "old.pem", days_left=-1)
        check_files(data, key, tmp_path / "old.pem")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentError, match="cannot reach the server"):
        probe_server("127.0.0.1", port, ca, wait=0)


def test_node_config_reaches_the_client_app_intact(tmp_path):
    from flwr.common.config import parse_config_args  # what flower-supernode uses

    from fedseal.client.site import site_settings
    from fedseal.common.config import FedConfig

    data = tmp_path / 'site "a" data.csv'
    policy = SitePolicy(
        require_secagg=False,
        min_cohort=4,
        min_secagg_k=3,
        min_secagg_threshold=3,
        max_colluders=2,
        max_update_clip=2.5,
        federated_eval="on",
        max_run_epsilon=2.0,
        allowed_models=("default", "/models/bert"),
        labels=("neg", "pos"),
    )
    values = node_config(
        data,
        "alpha",
        7.5,
        1e-6,
        tmp_path / "ledger.json",
        tmp_path / "keys" / "ledger.key",
        "cpu",
        policy,
        tmp_path / "alpha.key",
        tmp_path / "peers.txt",
        ("text", "stars"),
        reply_hold=12.5,
    )
    parsed = parse_config_args([str(write_node_config(tmp_path / "node.toml", values))])
    site = site_settings(parsed, FedConfig())
    assert (site.data_path, site.name, site.epsilon, site.delta) == (data, "alpha", 7.5, 1e-6)
    assert site.ledger_path == tmp_path / "ledger.json" and site.device == "cpu"
    assert site.ledger_key == tmp_path / "keys" / "ledger.key"
    assert site.policy == policy
    assert (site.identity_key, site.peers) == (tmp_path / "alpha.key", tmp_path / "peers.txt")
    assert (site.text_column, site.label_column) == ("text", "stars")
    assert reply_hold(parsed) == 12.5


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"min-cohort": 1}, "min-cohort must be at least 2"),
        ({"min-cohort": 2.5}, "min-cohort = 2.5, which is not a int"),
        ({"require-dp": "no"}, "require-dp = 'no'"),
        ({"federated-eval": "maybe"}, "federated-eval must be one of off, on"),
        ({"max-update-clip": 0}, "max-update-clip must be positive"),
        ({"max-colluders": -1}, "max-colluders must be at least 0"),
        ({"min-cohort": 2}, r"min-cohort = 2 is below max-colluders \+ 2 = 3.*--min-cohort.*--max-colluders"),
        ({"min-cohort": 3, "max-colluders": 2}, r"min-cohort = 3 is below max-colluders \+ 2 = 4"),
    ],
)
def test_a_bad_site_policy_is_named(tmp_path, entry, match):
    from fedseal.client.site import site_settings
    from fedseal.common.config import FedConfig

    node = {"data-path": str(tmp_path / "d.csv"), **entry}
    with pytest.raises(ConfigError, match=match):
        site_settings(node, FedConfig())


def test_proxy_config_forwards_only_the_fleet_api(tmp_path):
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from fedseal.server.proxy import FLEET_PATHS, caddy_bin, caddy_config

    # Every path a SuperNode calls, and only Fleet paths.
    called = {
        line.split('"')[1]
        for line in open(__import__("inspect").getsourcefile(FleetHttpClient)).read().splitlines()
        if "path=" in line
    }
    assert called == set(FLEET_PATHS) and all(p.startswith("/v1/fleet/") for p in FLEET_PATHS)
    config = caddy_config(
        "0.0.0.0:9093",
        "127.0.0.1:9094",
        (tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"),
        tmp_path,
    )
    assert config["admin"]["disabled"] is True
    server = config["apps"]["http"]["servers"]["fleet"]
    forward, refuse = server["routes"]
    assert forward["match"] == [{"method": ["POST"], "vars": {"{http.request.orig_uri}": list(FLEET_PATHS)}}]
    assert forward["handle"][0]["upstreams"] == [{"dial": "127.0.0.1:9094"}]
    assert forward["handle"][0]["transport"]["tls"]["ca"]["pem_files"] == [str(tmp_path / "ca.pem")]
    assert "match" not in refuse and refuse["handle"][0]["status_code"] == 404
    assert subprocess.run([caddy_bin(), "version"], capture_output=True).returncode == 0
    plain = caddy_config("127.0.0.1:9093", "127.0.0.1:9094", None, tmp_path)  # --insecure trials
    assert (
        "tls" not in plain["apps"]
        and "transport" not in (plain["apps"]["http"]["servers"]["fleet"]["routes"][0]["handle"][0])
    )


def _issue(path, ca_key, ca_name, host: str, *, days_left: int):
    """A server certificate for ``host`` signed by the CA, ``days_left`` from expiry."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now + dt.timedelta(days=days_left))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = path.with_suffix(".pem"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _serve_once(tls: tuple | None) -> int:
    """A one-connection server on 127.0.0.1: TLS with ``(cert, key)``, or plaintext bytes."""
    import ssl
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                if tls is None:
                    conn.sendall(b"HTTP/1.1 400 plaintext here\r\n\r\n")
                    return
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(*tls)
                try:
                    ctx.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    pass  # the client gave up on the handshake, as it should

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_agent_probe_names_each_tls_problem_of_a_real_server(tmp_path):
    ca = tmp_path / "ca.pem"
    ca_key, ca_name = _ca(ca, days_left=60)

    good = _issue(tmp_path / "good", ca_key, ca_name, "localhost", days_left=30)
    probe_server("localhost", _serve_once(good), ca, wait=0)  # the control: no error
    expired = _issue(tmp_path / "expired", ca_key, ca_name, "localhost", days_left=-1)
    with pytest.raises(AgentError, match="server's certificate has expired"):
        probe_server("localhost", _serve_once(expired), ca, wait=0)
    elsewhere = _issue(tmp_path / "elsewhere", ca_key, ca_name, "fl.example.org", days_left=30)
    with pytest.raises(AgentError, match="does not cover 'localhost'"):
        probe_server("localhost", _serve_once(elsewhere), ca, wait=0)
    with pytest.raises(AgentError, match="--insecure"):
        probe_server("localhost", _serve_once(None), ca, wait=0)
