"""``fedseal server --config FILE``: the SuperLink, its reverse proxy, and one federated run.

What it does, in order (each step fails with a message naming what to change):

1. reads the config file: a ``[server]`` table (below) and a ``[federation]``
   table with the run's settings (same names as ``fedseal simulate``); unknown
   tables or keys are errors;
2. checks the keys folder made by ``fedseal keys init`` and ``add-site`` (CA,
   server certificate not expired and covering the listen address, site
   public keys);
3. starts ``flower-superlink`` on ``127.0.0.1:<local-port>`` only, with TLS,
   SuperNode authentication and a persistent database in the state folder
   (``--insecure`` turns both off, with a warning, for a trial on one machine):
   its Control API (admit nodes, submit and stop runs) and Runtime API are
   reachable from this machine alone;
4. starts the reverse proxy (:mod:`fedseal.server.proxy`, Caddy) on ``address``: TLS
   with the server certificate, and only Flower's Fleet API paths forwarded;
5. registers every site's public key (Flower 1.41 takes the allowed list through
   its Control API, not at start-up);
6. writes the Flower app (fedseal's ``server``, ``client`` and ``common``
   packages plus a ``pyproject.toml`` holding the run's settings) and submits it
   with ``flwr run``; a run left over from before a restart is stopped first and
   the new one resumes from the checkpoint in ``<out>/checkpoint``;
7. streams the ServerApp's log, waits for the run to finish, stops the proxy and
   the SuperLink and exits 0 if the run completed, 1 if it failed (ended in error, or
   produced nothing: :mod:`fedseal.server.outcome`).

``[server]`` settings::

    address  = "0.0.0.0:9093"    # the reverse proxy: where sites connect (Fleet API only)
    local-port = 9094            # the SuperLink's own port, on 127.0.0.1 (default: port + 1)
    keys     = "keys"            # folder written by `fedseal keys init` and `add-site`
    state    = "fedseal-server"  # database, logs and the app bundle (mode 0700)
    sites    = []                # site names to admit; empty: every key in <keys>/sites
    insecure = false             # true: no TLS, no authentication (trials only)

Relative paths (here and in ``[federation]``: ``eval``, ``out``, a local
``model`` folder) are relative to the config file's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedseal.common.bundle import CLIENT_APP, PACKAGES, SERVER_APP, package_dir
from fedseal.common.config import ConfigError, FedConfig, from_mapping, read_toml, unknown_key
from fedseal.common.durable import atomic_write
from fedseal.common.errors import FedsealError
from fedseal.common.processes import (
    ProcessError,
    child_env,
    die_with_parent,
    flwr_bin,
    port_open,
    split_address,
    stop_process,
)
from fedseal.server.proxy import FleetProxy
from fedseal.server.report import REPORT_FILE

log = logging.getLogger("fedseal.server")

CONNECTION = "fedseal"  # the name of the Flower CLI connection to our own SuperLink
LOOPBACK = "127.0.0.1"  # the only address the SuperLink listens on
READY_TIMEOUT_S = 60.0
STATUS_POLL_S = 30.0
ALREADY_REGISTERED = "[code: 23]"  # flwr 1.41: "Public key already in use."


class LaunchError(FedsealError, RuntimeError):
    """The server cannot start or the run cannot be submitted; the message says why."""

    code = "launch.error"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The ``[server]`` table of the config file, paths resolved."""

    address: str = "0.0.0.0:9093"
    local_port: int = 0  # 0: the public port + 1
    keys: Path = Path("keys")
    state: Path = Path("fedseal-server")
    sites: tuple[str, ...] = ()
    insecure: bool = False

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]

    @property
    def superlink_port(self) -> int:
        """The SuperLink's own port on 127.0.0.1."""
        return self.local_port or self.port + 1

    @property
    def admin_address(self) -> str:
        """The SuperLink itself, on loopback: its Control and Runtime APIs are reachable only here."""
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def probe_address(self) -> str:
        """Where this machine reaches the reverse proxy (loopback when it listens on all)."""
        host = self.host
        if host in ("0.0.0.0", "::", "", "localhost"):
            host = LOOPBACK
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerSettings)}


def _resolve(base: Path, value: str) -> str:
    return str((base / value).resolve()) if value and not Path(value).is_absolute() else value


def load_server_config(path: str | Path, *, insecure: bool = False) -> tuple[ServerSettings, FedConfig]:
    """Read and validate ``[server]`` and ``[federation]``; resolve relative paths.

    Raises
    ------
    ConfigError
        On a missing file, invalid TOML, an unknown table or key, a bad value,
        or a federation without a held-out ``eval`` file.
    """
    path = Path(path)
    data = read_toml(path, what="server config")
    for table in data:
        if table not in ("server", "federation"):
            raise unknown_key(table, ("server", "federation"), f"unknown table [{table}] in {path}")
        if not isinstance(data[table], dict):
            raise ConfigError(f"{path}: {table!r} must be a table ([{table}])")
    base = path.resolve().parent
    raw_server = dict(data.get("server", {}))
    for key in raw_server:
        if key.replace("-", "_") not in SERVER_FIELDS:
            raise unknown_key(key, sorted(SERVER_FIELDS), f"unknown key {key!r} in {path} [server]")
    raw_server = {k.replace("-", "_"): v for k, v in raw_server.items()}
    sites = raw_server.get("sites", ())
    if isinstance(sites, str) or not all(isinstance(s, str) for s in sites):
        raise ConfigError(f'{path} [server]: sites must be a list of site names, e.g. ["alpha"]')
    if not isinstance(raw_server.get("insecure", False), bool):
        raise ConfigError(f"{path} [server]: insecure must be true or false")
    local_port = raw_server.get("local_port", 0)
    if isinstance(local_port, bool) or not isinstance(local_port, int) or not 0 <= local_port < 65536:
        raise ConfigError(f"{path} [server]: local-port must be a port number (or 0 for the public port + 1)")
    settings = ServerSettings(
        address=str(raw_server.get("address", ServerSettings.address)),
        local_port=local_port,
        keys=Path(_resolve(base, str(raw_server.get("keys", "keys")))),
        state=Path(_resolve(base, str(raw_server.get("state", "fedseal-server")))),
        sites=tuple(sites),
        insecure=bool(raw_server.get("insecure", False)) or insecure,
    )
    split_address(settings.address)
    if settings.superlink_port == settings.port:
        raise ConfigError(f"{path} [server]: local-port must differ from the address's port")
    fed = dict(data.get("federation", {}))
    cfg = from_mapping(fed, source=f"{path} [federation]")
    model = cfg.model
    if model != "default" and (base / model).exists():
        model = str((base / model).resolve())
    cfg = cfg.replace(
        eval=_resolve(base, cfg.eval),
        train=_resolve(base, cfg.train),
        out=_resolve(base, cfg.out),
        model=model,
        tensorboard=_resolve(base, cfg.tensorboard),
    )
    if not cfg.eval:
        raise ConfigError(
            f'{path} [federation]: set eval = "FILE", the held-out file the '
            "server scores the global model on each round"
        )
    if not Path(cfg.eval).is_file():
        raise ConfigError(f"{path} [federation]: eval file {cfg.eval} does not exist")
    return settings, cfg


# -- keys -------------------------------------------------------------------------------------


def check_keys(settings: ServerSettings) -> list[tuple[str, Path]]:
    """Check the keys folder; return ``(site, public key file)`` for every site to admit."""
    from cryptography import x509

    from fedseal.server.keys import CA_CERT, SERVER_CERT, SERVER_KEY, SITES_DIR, server_hosts

    keys = settings.keys
    if not keys.is_dir():
        raise LaunchError(
            f"keys folder {keys} does not exist: create it with `fedseal keys init "
            f"--out {keys} --server-host HOST`"
        )
    if not settings.insecure:
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (keys / name).is_file():
                raise LaunchError(f"{keys / name} is missing; rerun `fedseal keys init --out {keys}`")
        cert = x509.load_pem_x509_certificate((keys / SERVER_CERT).read_bytes())
        now = dt.datetime.now(dt.UTC)
        if cert.not_valid_after_utc < now:
            raise LaunchError(
                f"the server certificate {keys / SERVER_CERT} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d}; issue a new one with "
                f"`fedseal keys init --out {keys} --force ...`"
            )
        host = settings.host
        covered = server_hosts(cert)
        if host not in ("0.0.0.0", "::", "") and host not in covered:
            raise LaunchError(
                f"the server certificate covers {sorted(covered)}, not {host!r}; "
                "listen on one of those or re-issue the certificate"
            )
    pubs = {p.stem: p for p in sorted((keys / SITES_DIR).glob("*.pub"))}
    wanted = list(settings.sites) or sorted(pubs)
    missing = [s for s in wanted if s not in pubs]
    if missing:
        raise LaunchError(
            f"no public key for site(s) {missing} in {keys / SITES_DIR}; each site "
            "makes its key (`fedseal keys site`) and sends NAME.pub; admit it with "
            f"`fedseal keys add-site --out {keys} --name NAME --pub NAME.pub`"
        )
    if not wanted and not settings.insecure:
        raise LaunchError(f"no site keys in {keys / SITES_DIR}: no site could connect")
    return [(s, pubs[s]) for s in wanted]


# -- processes --------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Flwr:
    """The ``flwr`` CLI against our SuperLink, with JSON output checked (it exits 0 on failure)."""

    def __init__(self, flwr_home: Path, cwd: Path) -> None:
        self.env = child_env(flwr_home)
        self.cwd = cwd  # never a folder with a pyproject.toml that flwr would migrate

    def call(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        cmd = [flwr_bin("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                cmd, env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"success": False, "error-message": f"`flwr {args[0]}` timed out"}
        start = done.stdout.find("{")
        if start >= 0:
            try:
                out, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
            except json.JSONDecodeError:
                out = None
            if isinstance(out, dict):
                return out
        return {
            "success": False,
            "error-message": (done.stderr or done.stdout).strip()[-500:] or f"rc {done.returncode}",
        }


def write_flwr_config(flwr_home: Path, settings: ServerSettings) -> None:
    """The Flower CLI's connection to our SuperLink (``$FLWR_HOME/config.toml``)."""
    from fedseal.server.keys import CA_CERT

    flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": settings.admin_address}
    if settings.insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str((settings.keys / CA_CERT).resolve())
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    atomic_write(flwr_home / "config.toml", text.encode("utf-8"))


def write_app(app_dir: Path, cfg: FedConfig) -> Path:
    """The Flower app ``flwr run`` packs: fedseal's packages and the run's settings."""
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(
            package_dir(package), app_dir / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    try:
        version = importlib.metadata.version("fedseal")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.0"
    pyproject = {
        "project": {
            "name": "fedseal",
            "version": version,
            "dependencies": [],
            "description": "fedseal federated run (dependencies are installed at every site)",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedseal",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": cfg.to_run_config(),
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return app_dir


class Server:
    """The SuperLink process and the run submitted to it."""

    def __init__(self, settings: ServerSettings, cfg: FedConfig) -> None:
        self.settings, self.cfg = settings, cfg
        self.state = settings.state
        self.flwr_home = self.state / "flwr"
        self.flwr = Flwr(self.flwr_home, self.state)
        self.superlink: subprocess.Popen | None = None
        self.proxy: FleetProxy | None = None
        self.log_stream: subprocess.Popen | None = None

    # -- SuperLink ---------------------------------------------------------------------------

    def start_superlink(self) -> None:
        from fedseal.server.keys import CA_CERT, SERVER_CERT, SERVER_KEY

        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        write_flwr_config(self.flwr_home, self.settings)
        s = self.settings
        cmd = [
            flwr_bin("flower-superlink"),
            "--database",
            str(self.state / "state.db"),
            "--host",
            LOOPBACK,
            "--port",
            str(s.superlink_port),
            "--disable-runtime-dependency-installation",
        ]
        if s.insecure:
            cmd.append("--insecure")
        else:
            keys = s.keys.resolve()
            cmd += [
                "--ssl-ca-certfile",
                str(keys / CA_CERT),
                "--ssl-certfile",
                str(keys / SERVER_CERT),
                "--ssl-keyfile",
                str(keys / SERVER_KEY),
                "--enable-supernode-auth",
            ]
        for address, key in ((s.admin_address, "local-port"), (s.probe_address, "address")):
            if port_open(address):
                raise LaunchError(
                    f"something already listens on {address}: another SuperLink? "
                    f"Stop it or choose another [server] {key}"
                )
        self.superlink_log = self.state / "superlink.log"
        with self.superlink_log.open("ab") as out:
            self.superlink = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(self.flwr_home),
                cwd=self.state,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_open(s.admin_address):
            if self.superlink.poll() is not None:
                raise LaunchError(
                    f"flower-superlink exited with code {self.superlink.returncode}; "
                    f"last lines of {self.superlink_log}:\n{_tail(self.superlink_log)}"
                )
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"flower-superlink did not open {s.admin_address} within "
                    f"{READY_TIMEOUT_S:.0f}s; see {self.superlink_log}"
                )
            time.sleep(0.5)
        log.info(
            "SuperLink on %s, this machine only (%s); its log: %s",
            s.admin_address,
            "INSECURE: no TLS, no site authentication" if s.insecure else "TLS, SuperNode authentication",
            self.superlink_log,
        )

    def start_proxy(self) -> None:
        """The reverse proxy on the public address: TLS, Fleet API only (:mod:`fedseal.server.proxy`)."""
        from fedseal.server.keys import CA_CERT, SERVER_CERT, SERVER_KEY

        s = self.settings
        keys = s.keys.resolve()
        tls = None if s.insecure else (keys / SERVER_CERT, keys / SERVER_KEY, keys / CA_CERT)
        self.proxy = FleetProxy(self.state, s.address, s.admin_address, tls)
        try:
            self.proxy.start(s.probe_address)
        except ProcessError as exc:
            raise LaunchError(str(exc)) from None

    def register_sites(self, sites: list[tuple[str, Path]]) -> dict[str, str]:
        """Admit each site's public key; a key admitted before is fine."""
        if self.settings.insecure:
            return {}
        registered = {}
        for name, pub in sites:
            out = self.flwr.call("supernode", "register", str(pub.resolve()), CONNECTION, "--name", name)
            if out.get("success"):
                registered[name] = str(out.get("node-id"))
                log.info("site %s admitted (node %s)", name, registered[name])
            elif ALREADY_REGISTERED in str(out.get("error-message", "")):
                registered[name] = "registered before"
            else:
                raise LaunchError(f"could not register site {name!r} ({pub}): {out.get('error-message')}")
        atomic_write(self.state / "sites.json", json.dumps(registered, indent=2).encode())
        return registered

    # -- the run -----------------------------------------------------------------------------

    def submit(self) -> str:
        from fedseal.server.keys import SITES_DIR

        previous = self.state / "run.json"
        if previous.is_file():
            try:
                old = str(json.loads(previous.read_text(encoding="utf-8"))["run_id"])
            except (OSError, ValueError, KeyError, TypeError):
                old = ""
            if old:
                out = self.flwr.call("stop", old, CONNECTION)
                if out.get("success"):
                    log.info("stopped run %s left over from before the restart", old)
        app_dir = write_app(
            self.state / "app", self.cfg.replace(roster=str((self.settings.keys / SITES_DIR).resolve()))
        )
        out = self.flwr.call("run", str(app_dir), CONNECTION, timeout=300)
        if not out.get("success"):
            raise LaunchError(f"submitting the run failed: {out.get('error-message')}")
        run_id = str(out["run-id"])
        atomic_write(previous, json.dumps({"run_id": run_id, "submitted": time.time()}).encode())
        return run_id

    def stream_log(self, run_id: str) -> None:
        """Show the ServerApp's log here while the run goes on."""
        self.log_stream = subprocess.Popen(
            [flwr_bin("flwr"), "log", run_id, CONNECTION, "--stream"],
            env=self.flwr.env,
            cwd=self.state,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def wait(self, run_id: str) -> tuple[str, str]:
        """Block until the run finishes; return its status and details.

        The log stream ends when the run does, so the status is asked (a CLI
        call, about a second of CPU) then, and otherwise only every
        ``STATUS_POLL_S`` seconds.
        """
        last = time.monotonic()
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                return "superlink-exited", (
                    f"flower-superlink exited with code {self.superlink.returncode}; see {self.superlink_log}"
                )
            stream_ended = self.log_stream is not None and self.log_stream.poll() is not None
            if stream_ended or time.monotonic() - last > STATUS_POLL_S:
                last = time.monotonic()
                out = self.flwr.call("ls", CONNECTION, "--run-id", run_id)
                runs = out.get("runs") or []
                if out.get("success") and runs:
                    status = str(runs[0].get("status", ""))
                    if status.startswith("finished"):
                        return status, str(runs[0].get("status-details", ""))
                if stream_ended:
                    self.stream_log(run_id)  # the stream broke early: follow the run again
            time.sleep(1.0)

    def close(self) -> None:
        """Stop the log stream, the proxy and the SuperLink."""
        stop_process(self.log_stream, grace=2.0)
        if self.proxy is not None:
            self.proxy.stop()
        stop_process(self.superlink)


def serve(settings: ServerSettings, cfg: FedConfig) -> int:
    """Start the SuperLink, submit the run, wait for it; the process exit code."""
    sites = check_keys(settings)
    if settings.insecure:
        log.warning(
            "INSECURE MODE: no TLS and no site authentication; anyone who can reach %s "
            "can join or read the traffic. Use it only for a trial on one machine.",
            settings.address,
        )
    server = Server(settings, cfg)

    def on_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start_superlink()
        server.start_proxy()
        server.register_sites(sites)
        run_id = server.submit()
        out = Path(cfg.out)
        log.info(
            "run %s submitted (%d site(s) admitted)\n"
            "  progress        %s (one JSON line per round)\n"
            "  checkpoints     %s (a restart resumes from here)\n"
            "  final model     %s\n"
            "  ServerApp log   follows below; again with: FLWR_HOME=%s flwr log %s %s\n"
            "  SuperLink log   %s",
            run_id,
            len(sites),
            out / "metrics.jsonl",
            out / "checkpoint",
            out / "model",
            server.flwr_home,
            run_id,
            CONNECTION,
            server.superlink_log,
        )
        server.stream_log(run_id)
        status, details = server.wait(run_id)
        if server.log_stream is not None:
            try:
                server.log_stream.wait(timeout=5.0)  # let it print its last lines
            except subprocess.TimeoutExpired:
                pass
        if status != "finished:completed":
            log.error("run %s ended as %s: %s", run_id, status, details)
            return 1
        summary_path = out / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            eps = summary.get("epsilon_max")
            if summary.get("failed"):
                log.error(
                    "run %s FAILED: %s; what the rounds did: %s", run_id, summary["failed"], out / REPORT_FILE
                )
                return 1
            log.info(
                "run %s completed: accuracy %.4f, epsilon max %s; model in %s; report %s",
                run_id,
                summary["final_accuracy"],
                eps if eps is None else round(eps, 3),
                summary["model_dir"],
                out / REPORT_FILE,
            )
        return 0
    except KeyboardInterrupt:
        log.warning("stopping (restart with the same config to resume)")
        return 130
    finally:
        server.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedseal server``."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="TOML file with a [server] table (above) and a [federation] table "
        "of run settings (the names `fedseal simulate --help` lists)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no site authentication (trials on one machine only; default: off)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level log lines")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal server``."""
    from fedseal.common.cli import command_parser
    from fedseal.common.cli_args import setup_logging

    args = command_parser("server").parse_args(argv)

    setup_logging(args.verbose)
    settings, cfg = load_server_config(args.config, insecure=args.insecure)
    try:
        return serve(settings, cfg)
    except (LaunchError, ProcessError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
