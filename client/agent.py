"""``fedseal client``: the client agent at one data site (a Flower SuperNode).

::

    fedseal client --server HOST:PORT --ca ca.pem --key sites/alpha.key \\
        --data /data/alpha.csv --ledger /var/lib/fedseal/alpha-ledger.json \\
        [--epsilon 8 --delta 1e-5] [--device cuda|cpu]

Before starting the SuperNode it checks, and stops with a message saying what
to change: the data file is readable; the key is an OpenSSH private key (as
``fedseal keys init`` writes); the CA certificate is valid; the privacy ledger
opens (created on first use; a corrupted or hand-edited one is refused, never
reset); the server is reachable and its certificate verifies against the CA.
Then it runs ``flower-supernode`` with the site's data path, budget, ledger
path and device in the node config, where the ClientApp reads them
(:mod:`client.site`). The data never leaves this machine; only masked updates
do, and no log line prints a training example.

If the server keeps refusing the site's key (for ``--wait`` seconds) the agent
says so and exits 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from client.ledger import LedgerError, PrivacyLedger
from common.config import ConfigError
from common.durable import atomic_write
from common.processes import (ProcessError, child_env, die_with_parent, flwr_bin, split_address,
                              stop_process)

log = logging.getLogger("fedseal.client")

KEY_REFUSED = "Failed to activate SuperNode"  # flwr 1.41 ([code: 2004]): key not admitted
EXIT_KEY_REFUSED = 3


class AgentError(RuntimeError):
    """The agent cannot start; the message says what to change."""


def check_files(data: Path, key: Path | None, ca: Path | None) -> None:
    """Data readable; key an OpenSSH private key; CA a valid certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not data.is_file():
        raise AgentError(f"--data {data} does not exist or is not a file")
    try:
        with data.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise AgentError(f"--data {data} cannot be read: {exc.strerror}") from None
    if key is not None:
        if not key.is_file():
            raise AgentError(f"--key {key} does not exist; use the site key from "
                             "`fedseal keys init` (DIR/sites/NAME.key)")
        try:
            load_ssh_private_key(key.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise AgentError(f"--key {key} is not an unencrypted OpenSSH private key ({exc}); use "
                             "DIR/sites/NAME.key from `fedseal keys init`, not the .pub file") from None
    if ca is not None:
        if not ca.is_file():
            raise AgentError(f"--ca {ca} does not exist; copy ca.pem from the server's keys folder")
        try:
            cert = x509.load_pem_x509_certificate(ca.read_bytes())
        except ValueError:
            raise AgentError(f"--ca {ca} is not a PEM certificate; use the federation's ca.pem") from None
        if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
            raise AgentError(f"the CA certificate {ca} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                             "ask the server operator for the federation's current ca.pem")


def probe_server(host: str, port: int, ca: Path | None, wait: float) -> None:
    """Connect once with TLS (verified against ``ca``) so errors are clear before Flower retries.

    Retries an unreachable server for ``wait`` seconds; certificate problems fail at once.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=5.0) as sock:
                if ca is None:
                    return
                ctx = ssl.create_default_context(cafile=str(ca))
                ctx.set_alpn_protocols(["h2"])
                with ctx.wrap_socket(sock, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or str(exc)
            if "expired" in reason:
                raise AgentError(f"the server's certificate has expired ({reason}); the server "
                                 "operator must issue a new one (`fedseal keys init --force`)") from None
            if "match" in reason or "mismatch" in reason:
                raise AgentError(f"the server's certificate does not cover {host!r} ({reason}); "
                                 "connect with a name or address it was issued for") from None
            raise AgentError(f"the server's certificate does not verify against --ca {ca} "
                             f"({reason}): use this federation's ca.pem") from None
        except ssl.SSLError as exc:
            raise AgentError(f"TLS with {host}:{port} failed ({exc.reason or exc}); is the server "
                             "running without TLS (--insecure)? Then both sides must say so") from None
        except (ConnectionRefusedError, socket.timeout, TimeoutError, socket.gaierror, OSError) as exc:
            if time.monotonic() > deadline:
                raise AgentError(f"cannot reach the server at {host}:{port} ({exc}); check "
                                 "--server, that `fedseal server` runs there, and the firewall") from None
            time.sleep(2.0)


def write_node_config(path: Path, data: Path, name: str, epsilon: float, delta: float,
                      ledger: Path, device: str) -> Path:
    """The SuperNode's ``--node-config`` file: what the ClientApp reads in :mod:`client.site`.

    A TOML file rather than ``key=value`` text: Flower 1.41 splits that text
    with a regular expression that breaks on quotes inside a path.
    """
    import tomli_w

    values = {"data-path": str(data), "site-name": name, "epsilon": float(epsilon),
              "delta": float(delta), "ledger-path": str(ledger), "device": device}
    atomic_write(path, tomli_w.dumps(values).encode("utf-8"))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_supernode(cmd: list[str], env: dict[str, str], wait: float) -> int:
    """Run the SuperNode; retry a refused key for ``wait`` seconds, then say so clearly.

    The SuperLink refuses a key it has not admitted yet (the server may still be
    registering keys) and, for about a minute, the key of a SuperNode that just
    died (it still counts as online); both pass if the agent tries again.
    """
    deadline = time.monotonic() + wait
    while True:
        code = _supernode_once(cmd, env)
        if code != EXIT_KEY_REFUSED or time.monotonic() > deadline:
            break
        log.warning("the server refused this site's key; trying again in 5s (until --wait "
                    "runs out: the key may not be admitted yet)")
        time.sleep(5.0)
    if code == EXIT_KEY_REFUSED:
        print("fedseal client: error: the server refused this site's key: it is not in the "
              "server's allowed list (or the same key is connected from elsewhere). Ask the "
              "operator to admit the matching .pub file (list the site in [server] sites and "
              "restart fedseal server).", file=sys.stderr)
    return code


def _supernode_once(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1,
                            preexec_fn=die_with_parent)
    refused = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if KEY_REFUSED in line:
                refused.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def on_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while proc.poll() is None:
            if refused.is_set():
                stop_process(proc, grace=5.0)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_process(proc, grace=10.0)
        return 130
    reader.join(timeout=2.0)
    return EXIT_KEY_REFUSED if refused.is_set() else int(proc.returncode or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal client``."""
    parser = argparse.ArgumentParser(prog="fedseal client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--ca", type=Path, metavar="FILE", help="the federation's ca.pem")
    parser.add_argument("--key", type=Path, metavar="FILE", help="this site's key (sites/NAME.key)")
    parser.add_argument("--data", type=Path, required=True, metavar="FILE",
                        help="this site's CSV, TSV or JSONL file (never leaves the machine)")
    parser.add_argument("--ledger", type=Path, required=True, metavar="FILE",
                        help="this site's privacy ledger (created on first use; keep it)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the site's total budget (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5, help="default 1e-5")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--name", help="site name in logs and the ledger (default: the key's name)")
    parser.add_argument("--runtime-port", type=int, default=0,
                        help="local port of the SuperNode's runtime API (default: a free one)")
    parser.add_argument("--home", type=Path,
                        help="Flower's working folder (default: beside the ledger)")
    parser.add_argument("--wait", type=float, default=90.0,
                        help="seconds to keep trying at start while the server is unreachable or "
                             "has not admitted this site's key yet (default 90)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no authentication (only against `fedseal server --insecure`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (AgentError, LedgerError, ConfigError, ProcessError) as exc:
        print(f"fedseal client: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    host, port = split_address(args.server, "--server", "fl.example.org:9093")
    if not args.insecure and (args.ca is None or args.key is None):
        raise AgentError("--ca and --key are required (the federation's ca.pem and this site's "
                         "key from `fedseal keys init`); --insecure only for a trial server")
    if args.insecure:
        log.warning("INSECURE: no TLS, no authentication; never use this with real data")
    data, ledger_path = args.data.resolve(), args.ledger.resolve()
    check_files(data, None if args.insecure else args.key, None if args.insecure else args.ca)
    name = args.name or (args.key.stem if args.key else data.stem)
    if not ledger_path.parent.is_dir():
        raise AgentError(f"--ledger {args.ledger}: folder {ledger_path.parent} does not exist")
    ledger = PrivacyLedger.open(ledger_path, name, args.epsilon, args.delta)
    log.info("site %s: ledger %s, epsilon spent %.3f of %g (delta %g)", name, ledger_path,
             ledger.epsilon_spent(), args.epsilon, args.delta)
    probe_server(host, port, None if args.insecure else args.ca.resolve(), args.wait)
    home = (args.home or ledger_path.parent / f".fedseal-{name}").resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    cmd = [flwr_bin("flower-supernode"), "--superlink", f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
           "--node-config", str(write_node_config(home / "node-config.toml", data, name, args.epsilon,
                                                  args.delta, ledger_path, args.device)),
           "--port", str(args.runtime_port or free_port())]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(args.ca.resolve()),
                "--auth-supernode-private-key", str(args.key.resolve())]
    log.info("site %s: connecting to %s:%d (data %s stays here)", name, host, port, data)
    return run_supernode(cmd, child_env(home), args.wait)


if __name__ == "__main__":
    sys.exit(main())
