"""``fedseal client``: the client agent at one data site (a Flower SuperNode and its runner).

::

    fedseal client --server HOST:PORT --ca ca.pem --key keys/alpha.key --peers peers.txt \\
        --data /data/alpha.csv --ledger /var/lib/fedseal/alpha-ledger.json \\
        --ledger-key /etc/fedseal/alpha-ledger.key --labels negative,positive \\
        [--text-column sentence --label-column label] [--epsilon 8 --delta 1e-5] \\
        [--device cuda|cpu] [policy flags]

Before starting anything it checks, and stops with a message saying what to
change: the data file reads with the site's own columns and holds only the
labels the site declared (``--labels``, required; the same reader the rounds use); the key is an OpenSSH private key (as
``fedseal keys site`` writes); the peers roster holds OpenSSH public keys; the
CA certificate is valid; the site's policy is coherent; the privacy ledger
opens (created on first use; an edited, older or deleted one is refused, never
reset) and holds the total given by ``--epsilon`` and ``--delta`` (``fedseal
ledger raise`` changes it); the server is reachable and its certificate
verifies against the CA.

Then it runs ``flower-supernode --isolation process`` with the site's data
path, budget, ledger, keys and policy in the node config, where the ClientApp
reads them (:mod:`fedseal.client.site`), and beside it the site's ClientApp runner
(:mod:`fedseal.client.runner`), which runs only the fedseal installed here. The
SuperNode's Runtime API listens on 127.0.0.1 only, and the runner's task
requests are signed with a secret made for each start. The data never leaves
this machine; only masked updates do, and no log line prints a training
example.

Policy flags (what every run must promise; the server cannot lower them):
``--no-require-dp``, ``--no-require-secagg``, ``--min-cohort N`` (3),
``--min-secagg-k K`` (2), ``--min-secagg-threshold T`` (2), ``--max-colluders C`` (1),
``--max-update-clip C`` (64), ``--federated-eval off|on`` (off), ``--allow-model NAME``
(default: the packaged model; repeatable), ``--max-run-epsilon E`` (the total: a run
may ask for all that is left).

``--reply-hold SECONDS`` (0): each reply whose work read the site's data leaves
that long after its handling began, so that its arrival time does not track the
site's record count (:func:`fedseal.client.site.reply_hold`).

If the server keeps refusing the site's key (for ``--wait`` seconds) the agent
says so and exits 3. When the server goes away (its run ended) the agent says
so once, waits ``--linger`` seconds for it to come back (a restarted server
resumes its run), then stops with exit 0; SIGTERM stops it at once, also with
exit 0 (Ctrl-C: 130).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedseal.client.ledger import LedgerError, PrivacyLedger
from fedseal.client.ledger_cli import add_ledger_files
from fedseal.client.pinning import installed_manifest, manifest_digest
from fedseal.client.site import (
    DEFAULT_LABEL_COLUMN,
    DEFAULT_TEXT_COLUMN,
    FEDERATED_EVAL_MODES,
    MAX_REPLY_HOLD,
    SitePolicy,
    reply_hold,
)
from fedseal.common.config import AUTO, CHOICES, ConfigError
from fedseal.common.durable import atomic_write
from fedseal.common.errors import FedsealError
from fedseal.common.processes import (
    ProcessError,
    child_env,
    die_with_parent,
    flwr_bin,
    split_address,
    stop_process,
)

log = logging.getLogger("fedseal.client")

KEY_REFUSED = "Failed to activate SuperNode"  # flwr 1.41 ([code: 2004]): key not admitted
EXIT_KEY_REFUSED = 3


class AgentError(FedsealError, RuntimeError):
    """The agent cannot start; the message says what to change."""

    code = "agent.error"


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
            raise AgentError(
                f"--key {key} does not exist; make this site's key with "
                "`fedseal keys site --name NAME --out DIR` (DIR/NAME.key)"
            )
        try:
            load_ssh_private_key(key.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise AgentError(
                f"--key {key} is not an unencrypted OpenSSH private key ({exc}); use "
                "DIR/NAME.key from `fedseal keys site`, not the .pub file"
            ) from None
    if ca is not None:
        if not ca.is_file():
            raise AgentError(f"--ca {ca} does not exist; copy ca.pem from the server's keys folder")
        try:
            cert = x509.load_pem_x509_certificate(ca.read_bytes())
        except ValueError:
            raise AgentError(f"--ca {ca} is not a PEM certificate; use the federation's ca.pem") from None
        if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
            raise AgentError(
                f"the CA certificate {ca} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                "ask the server operator for the federation's current ca.pem"
            )


def check_peers(peers: Path) -> int:
    """The roster holds one OpenSSH public key per line (blank lines and ``#`` comments aside).

    Returns the number of keys. Raises :class:`AgentError` naming the bad line.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        lines = peers.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(
            f"--peers {peers} cannot be read ({exc}); it lists the fellow sites' "
            "public keys (their NAME.pub lines)"
        ) from None
    count = 0
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            load_ssh_public_key(line.strip().encode("ascii"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise AgentError(
                f"--peers {peers} line {number} is not an OpenSSH public key ({exc}); "
                "put one site's NAME.pub line per line"
            ) from None
        count += 1
    if count == 0:
        raise AgentError(
            f"--peers {peers} holds no public key: list the sites this site accepts "
            "as fellow members (their NAME.pub files, one per line)"
        )
    return count


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
                raise AgentError(
                    f"the server's certificate has expired ({reason}); the server "
                    "operator must issue a new one (`fedseal keys init --force`)"
                ) from None
            if "match" in reason or "mismatch" in reason:
                raise AgentError(
                    f"the server's certificate does not cover {host!r} ({reason}); "
                    "connect with a name or address it was issued for"
                ) from None
            raise AgentError(
                f"the server's certificate does not verify against --ca {ca} "
                f"({reason}): use this federation's ca.pem"
            ) from None
        except ssl.SSLError as exc:
            raise AgentError(
                f"TLS with {host}:{port} failed ({exc.reason or exc}); is the server "
                "running without TLS (--insecure)? Then both sides must say so"
            ) from None
        except (ConnectionRefusedError, TimeoutError, socket.gaierror, OSError) as exc:
            if time.monotonic() > deadline:
                raise AgentError(
                    f"cannot reach the server at {host}:{port} ({exc}); check "
                    "--server, that `fedseal server` runs there, and the firewall"
                ) from None
            time.sleep(2.0)


def check_data(
    data: Path, text_column: str, label_column: str, labels: tuple[str, ...] | None
) -> tuple[str, ...]:
    """Read the site's file at start with the reader the rounds use; return its declared labels.

    Without ``labels`` (``--labels``) the agent refuses to start, showing the
    labels the file holds: the site declares its label set itself, so a server
    can never learn it by asking (a run's labels are compared with the
    declaration, never with the file).

    Raises
    ------
    AgentError
        Saying what to fix in the file or which flag to give.
    """
    from fedseal.common.data import DataError, read_examples

    hint = (
        f" (read with --text-column {text_column!r} and --label-column {label_column!r}; "
        "change them to match the file's header or keys)"
    )
    try:
        examples = read_examples(
            data, text_column=text_column, label_column=label_column, label_names=labels or None
        )
    except DataError as exc:
        message = str(exc).replace("Set --text-column / --label-column", "").rstrip(". ")
        message = message.replace("fix the file or set --labels", "fix the file or --labels")
        raise AgentError(f"--data: {message}{hint}") from None
    if not labels:
        raise AgentError(
            f"--labels is required: declare the label set of this site's data (the "
            f"file {data} holds {list(examples.label_names)}); a run is accepted only "
            "with exactly these labels"
        )
    return tuple(labels)


def node_config(
    data: Path,
    name: str,
    epsilon: float,
    delta: float,
    ledger: Path,
    ledger_key: Path,
    device: str,
    policy: SitePolicy,
    identity_key: Path | None,
    peers: Path | None,
    columns: tuple[str, str],
    *,
    reply_hold: float,
) -> dict[str, object]:
    """What the ClientApp reads in :mod:`fedseal.client.site`: the site's own settings and policy."""
    values: dict[str, object] = {
        "data-path": str(data),
        "site-name": name,
        "epsilon": float(epsilon),
        "delta": float(delta),
        "ledger-path": str(ledger),
        "ledger-key": str(ledger_key),
        "device": device,
        "text-column": columns[0],
        "label-column": columns[1],
        "allow-model": ",".join(policy.allowed_models),
        "labels": ",".join(policy.labels),
        "require-dp": policy.require_dp,
        "require-secagg": policy.require_secagg,
        "min-cohort": policy.min_cohort,
        "min-secagg-k": policy.min_secagg_k,
        "min-secagg-threshold": policy.min_secagg_threshold,
        "max-colluders": policy.max_colluders,
        "max-update-clip": float(policy.max_update_clip),
        "federated-eval": policy.federated_eval,
        "reply-hold": float(reply_hold),
    }
    if math.isfinite(policy.max_run_epsilon):  # unset: the site's total caps a run
        values["max-run-epsilon"] = float(policy.max_run_epsilon)
    if identity_key is not None:
        values["identity-key"] = str(identity_key)
    if peers is not None:
        values["peers"] = str(peers)
    return values


def write_node_config(path: Path, values: dict[str, object]) -> Path:
    """The SuperNode's ``--node-config`` file.

    A TOML file rather than ``key=value`` text: Flower 1.41 splits that text
    with a regular expression that breaks on quotes inside a path.
    """
    import tomli_w

    atomic_write(path, tomli_w.dumps(values).encode("utf-8"))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""Terminal colour codes, which Flower writes even into a log file."""
RETRYING = "Connection attempt failed"  # flwr 1.41's retry line, once per attempt


class ServerWatch:
    """What the SuperNode's output says about the server: lost since when, back again.

    Flower's SuperNode retries a lost server for ever, one coloured line per
    attempt. The agent prints the first such line as one plain sentence, drops
    the rest, and says when the server is back; :meth:`gone_for` tells the agent
    how long it has been gone, so it can stop once a run has ended.
    """

    def __init__(self, name: str, linger: float, clock=time.monotonic) -> None:
        self.name, self.linger, self._clock = name, linger, clock
        self.lost_since: float | None = None
        self.refused = False

    def line(self, text: str) -> str | None:
        """The line to print for one line of SuperNode output (``None``: print nothing)."""
        text = ANSI.sub("", text)
        if KEY_REFUSED in text:
            self.refused = True
        if RETRYING in text:
            if self.lost_since is not None:
                return None
            self.lost_since = self._clock()
            return (
                f"site {self.name}: lost the server (its run ended, or the network is "
                f"down); waiting up to {self.linger:g}s for it to come back (--linger), "
                "then stopping; SIGTERM or Ctrl-C stops this site now\n"
            )
        if self.lost_since is not None:
            self.lost_since = None
            return f"site {self.name}: the server is back\n{text}"
        return text

    def gone_for(self) -> float:
        """Seconds since the server was lost (0 while it answers)."""
        return 0.0 if self.lost_since is None else self._clock() - self.lost_since


def run_supernode(cmd: list[str], env: dict[str, str], wait: float, watch: ServerWatch) -> int:
    """Run the SuperNode; retry a refused key for ``wait`` seconds, then say so clearly.

    The SuperLink refuses a key it has not admitted yet (the server may still be
    registering keys) and, for about a minute, the key of a SuperNode that just
    died (it still counts as online); both pass if the agent tries again.
    """
    deadline = time.monotonic() + wait
    while True:
        watch.refused = False
        code = _supernode_once(cmd, env, watch)
        if code != EXIT_KEY_REFUSED or time.monotonic() > deadline:
            break
        log.warning(
            "the server refused this site's key; trying again in 5s (until --wait "
            "runs out: the key may not be admitted yet)"
        )
        time.sleep(5.0)
    if code == EXIT_KEY_REFUSED:
        print(
            "fedseal client: error: the server refused this site's key: it is not in the "
            "server's allowed list (or the same key is connected from elsewhere). Ask the "
            "operator to admit the matching .pub file (list the site in [server] sites and "
            "restart fedseal server).",
            file=sys.stderr,
        )
    return code


class _Stop(BaseException):
    """A signal asked the agent to stop (``signum``); not an error, so no ``except Exception`` catches it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _supernode_once(cmd: list[str], env: dict[str, str], watch: ServerWatch) -> int:
    """One SuperNode process, its output through ``watch``.

    Returns 0 when the server stayed away for ``watch.linger`` seconds (a run
    ended) or SIGTERM stopped the site, 130 on Ctrl-C, :data:`EXIT_KEY_REFUSED`
    when the server refused the key, else the SuperNode's exit code.
    """
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        preexec_fn=die_with_parent,
    )

    reader = _pump(proc, watch.line)

    def on_signal(signum, frame):  # noqa: ARG001
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None:
            if watch.refused:
                stop_process(proc, grace=5.0)
                break
            if watch.gone_for() > watch.linger:
                log.info(
                    "site %s: the server has been gone for %.0fs: stopping this site "
                    "(exit 0); start fedseal client again for the next run",
                    watch.name,
                    watch.gone_for(),
                )
                stop_process(proc, grace=10.0)
                return 0
            time.sleep(0.2)
    except _Stop as stop:
        stop_process(proc, grace=10.0)
        if stop.signum == signal.SIGINT:
            return 130
        log.info("site %s: stopped on SIGTERM (exit 0); its ledger is closed and kept", watch.name)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=2.0)
    return EXIT_KEY_REFUSED if watch.refused else int(proc.returncode or 0)


def _pump(proc: subprocess.Popen, transform: Callable[[str], str | None]) -> threading.Thread:
    """Copy ``proc``'s output to this agent's stdout, line by line through ``transform``."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            shown = transform(line)
            if shown is not None:
                sys.stdout.write(shown)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return reader


def _runner_line(text: str) -> str | None:
    """A runner's line, plain; its retries of the local SuperNode are dropped (the SuperNode's
    own output tells whether the server is there)."""
    return None if RETRYING in text else ANSI.sub("", text)


def start_runner(home: Path, runtime_address: str, env: dict[str, str]) -> subprocess.Popen:
    """The site's ClientApp runner (:mod:`fedseal.client.runner`), with a fresh task-signing secret."""
    secret = home / "runtime.secret"
    atomic_write(secret, secrets.token_bytes(32))
    os.chmod(secret, 0o600)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedseal.client.runner",
            "--runtime-api-address",
            runtime_address,
            "--auth-secret-file",
            str(secret),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=die_with_parent,
    )
    _pump(proc, _runner_line)
    return proc


def _policy(args: argparse.Namespace, labels: tuple[str, ...]) -> SitePolicy:
    return SitePolicy(
        require_dp=args.require_dp,
        require_secagg=args.require_secagg,
        min_cohort=args.min_cohort,
        min_secagg_k=args.min_secagg_k,
        min_secagg_threshold=args.min_secagg_threshold,
        max_colluders=args.max_colluders,
        max_update_clip=args.max_update_clip,
        federated_eval=args.federated_eval,
        allowed_models=tuple(args.allow_model or SitePolicy().allowed_models),
        labels=labels,
        max_run_epsilon=(math.inf if args.max_run_epsilon is None else args.max_run_epsilon),
    )


def _labels(text: str) -> tuple[str, ...]:
    """``--labels``: comma-separated label names."""
    labels = tuple(item.strip() for item in text.split(",") if item.strip())
    if not labels or len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"must be distinct label names separated by commas, got {text!r}")
    return labels


def _hold_seconds(text: str) -> float:
    """``--reply-hold``: what :func:`~fedseal.client.site.reply_hold` accepts, from the command line."""
    try:
        return reply_hold({"reply-hold": float(text)})
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_REPLY_HOLD:g}, got {text!r}"
        ) from None


def _port_or_auto(text: str) -> int | str:
    """``--runtime-port``: ``auto`` or a TCP port number."""
    if text.strip().lower() == AUTO:
        return AUTO
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be auto or a port number 1-65535, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedseal client``: files, budget, the site's policy, start-up."""
    defaults = SitePolicy()
    parser.add_argument(
        "--server",
        required=True,
        metavar="HOST:PORT",
        help="where the federation's server listens (its `address`)",
    )
    parser.add_argument("--ca", type=Path, metavar="FILE", help="the federation's ca.pem")
    parser.add_argument(
        "--key", type=Path, metavar="FILE", help="this site's private key (from `fedseal keys site`)"
    )
    parser.add_argument(
        "--peers",
        type=Path,
        metavar="FILE",
        help="the public keys (NAME.pub lines) of the sites this site accepts "
        "as fellow members, one per line",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="this site's CSV, TSV or JSONL file (never leaves the machine)",
    )
    parser.add_argument(
        "--text-column",
        default=DEFAULT_TEXT_COLUMN,
        metavar="NAME",
        help="the column (or JSONL key) of --data holding the text (default: "
        "%(default)s); the server's column settings are never used here",
    )
    parser.add_argument(
        "--label-column",
        default=DEFAULT_LABEL_COLUMN,
        metavar="NAME",
        help="the column (or JSONL key) of --data holding the label (default: %(default)s)",
    )
    parser.add_argument(
        "--labels",
        type=_labels,
        metavar="A,B,...",
        help="the label set of --data, declared by the site (required): a run is "
        "accepted only with exactly these labels, and a file holding another "
        "label is refused at start",
    )
    add_ledger_files(parser)
    parser.add_argument(
        "--epsilon",
        type=float,
        default=8.0,
        help="the site's total privacy budget epsilon over all runs, record level "
        "(positive; default: %(default)s). Each run asks for its share (its "
        "config's epsilon) and is refused when less is left. Fixed in the "
        "ledger when it is made; raise it on purpose with `fedseal ledger "
        "raise`, then start the agent with the new value",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=1e-5,
        help="the site's total privacy budget delta over all runs, in (0, 1) "
        "(default: %(default)s). Each run gets at most its epsilon's share "
        "of the delta left, so the runs' deltas add up to no more; raised "
        "like --epsilon",
    )
    parser.add_argument(
        "--device",
        choices=CHOICES["device"],
        default="auto",
        help="where this site trains: auto (CUDA when present, else CPU), cpu or cuda (default: %(default)s)",
    )
    parser.add_argument("--name", help="site name in logs and the ledger (default: the key's name)")
    policy = parser.add_argument_group("the site's policy (what every run must promise)")
    policy.add_argument(
        "--require-dp",
        action=argparse.BooleanOptionalAction,
        default=defaults.require_dp,
        help="train only with DP (--no-require-dp allows runs without it)",
    )
    policy.add_argument(
        "--require-secagg",
        action=argparse.BooleanOptionalAction,
        default=defaults.require_secagg,
        help="send updates only under secure aggregation (--no-require-secagg allows plain rounds)",
    )
    policy.add_argument(
        "--min-cohort",
        type=int,
        default=defaults.min_cohort,
        metavar="N",
        help="fewest sites in a secure round, and in the run's clients and "
        "min-clients (integer >= 2; default: %(default)s)",
    )
    policy.add_argument(
        "--min-secagg-k",
        type=int,
        default=defaults.min_secagg_k,
        metavar="K",
        help="fewest SecAgg+ neighbours per site the run may set and a round may "
        "have (integer >= 1; default: %(default)s)",
    )
    policy.add_argument(
        "--min-secagg-threshold",
        type=int,
        default=defaults.min_secagg_threshold,
        metavar="T",
        help="smallest SecAgg+ Shamir threshold the run may set and a "
        "round may have (integer >= 2; default: %(default)s)",
    )
    policy.add_argument(
        "--max-colluders",
        type=int,
        default=defaults.max_colluders,
        metavar="C",
        help="sites colluding with the server that a secure round must withstand: "
        "refuse a round whose k and t give 2t-k-1 <= C (integer >= 0, at "
        "most min-cohort - 2; default: %(default)s)",
    )
    policy.add_argument(
        "--max-update-clip",
        type=float,
        default=defaults.max_update_clip,
        metavar="C",
        help="largest per-coordinate update clip (the run's "
        "update-clip) the site accepts (positive; default: "
        "%(default)s)",
    )
    policy.add_argument(
        "--allow-model",
        action="append",
        metavar="NAME",
        help="a model this site runs, exactly as a run names it (a hub name or a "
        "folder of this machine); repeat for several (default: default, the "
        "packaged all-MiniLM-L6-v2). Any other model is refused before any "
        "file is touched",
    )
    policy.add_argument(
        "--max-run-epsilon",
        type=float,
        metavar="E",
        help="most epsilon one run may ask for out of the site's total; a run "
        "asking more is refused (positive; default: the total, so a run "
        "may ask for all that is left: the stock run asks for 8 of the "
        "stock total 8; set it lower to make the total last several runs)",
    )
    policy.add_argument(
        "--federated-eval",
        choices=FEDERATED_EVAL_MODES,
        default=defaults.federated_eval,
        help="on: score the server's model on this site's data when a run asks; off: refuse (default: off)",
    )
    parser.add_argument(
        "--runtime-port",
        type=_port_or_auto,
        default=AUTO,
        metavar="auto|PORT",
        help="local port (on 127.0.0.1) of the SuperNode's runtime API, 1-65535, "
        "or auto: a free one (default: auto)",
    )
    parser.add_argument("--home", type=Path, help="Flower's working folder (default: beside the ledger)")
    parser.add_argument(
        "--wait",
        type=float,
        default=90.0,
        help="seconds to keep trying at start while the server is unreachable or "
        "has not admitted this site's key yet (default: %(default)s)",
    )
    parser.add_argument(
        "--reply-hold",
        type=_hold_seconds,
        default=0.0,
        metavar="SECONDS",
        help="hold each reply whose work read this site's data until SECONDS after its "
        "handling began, so that when it reaches the server does not track how many "
        "records the site has; set it above the longest round's work, which the "
        "site's log shows when a reply is late, and at most half the server's "
        "timeout (a run whose timeout is below two holds is refused; default: 0, "
        "reply when ready)",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=300.0,
        help="seconds to wait for a lost server to come back (a restart) "
        "before this site stops with exit 0, as it does once a run has "
        "ended (default: %(default)s)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no authentication (only against `fedseal server --insecure`; default: off)",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal client``."""
    from fedseal.common.cli import command_parser

    args = command_parser("client").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (AgentError, LedgerError, ConfigError, ProcessError) as exc:
        print(f"fedseal client: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    host, port = split_address(args.server, "--server", "fl.example.org:9093")
    if not args.insecure and (args.ca is None or args.key is None):
        raise AgentError(
            "--ca and --key are required (the federation's ca.pem and this site's "
            "key from `fedseal keys site`); --insecure only for a trial server"
        )
    if args.insecure:
        log.warning("INSECURE: no TLS, no authentication; never use this with real data")
    data, ledger_path = args.data.resolve(), args.ledger.resolve()
    check_files(data, args.key if args.key is not None else None, None if args.insecure else args.ca)
    policy = _policy(args, check_data(data, args.text_column, args.label_column, args.labels))
    if args.peers is not None:
        log.info("peers roster %s: %d site key(s)", args.peers, check_peers(args.peers))
    name = args.name or (args.key.stem if args.key else data.stem)
    if not ledger_path.parent.is_dir():
        raise AgentError(f"--ledger {args.ledger}: folder {ledger_path.parent} does not exist")
    ledger_key = args.ledger_key.resolve()
    ledger = PrivacyLedger.open(ledger_path, name, args.epsilon, args.delta, key_path=ledger_key)
    left = ledger.remaining()
    log.info(
        "site %s: ledger %s, total epsilon %g, delta %g; %d job(s) spent epsilon %.4g, "
        "delta %.3g; left for new runs: epsilon %.4g, delta %.3g (fedseal ledger show)",
        name,
        ledger_path,
        args.epsilon,
        args.delta,
        len(ledger.jobs()),
        ledger.epsilon_spent(),
        ledger.delta_spent(),
        max(left.epsilon, 0.0),
        max(left.delta, 0.0),
    )
    if left.epsilon <= 0 or left.delta <= 0:
        log.warning(
            "site %s: nothing is left of its budget: it will refuse every new run "
            "until the total is raised (fedseal ledger raise)",
            name,
        )
    log.info(
        "site %s: policy %s; runs only fedseal code %s",
        name,
        policy,
        manifest_digest(installed_manifest())[:16],
    )
    probe_server(host, port, None if args.insecure else args.ca.resolve(), args.wait)
    home = (args.home or ledger_path.parent / f".fedseal-{name}").resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    runtime_port = free_port() if args.runtime_port == AUTO else args.runtime_port
    values = node_config(
        data,
        name,
        args.epsilon,
        args.delta,
        ledger_path,
        ledger_key,
        args.device,
        policy,
        args.key.resolve() if args.key else None,
        args.peers.resolve() if args.peers else None,
        (args.text_column, args.label_column),
        reply_hold=args.reply_hold,
    )
    cmd = [
        flwr_bin("flower-supernode"),
        "--superlink",
        f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
        "--node-config",
        str(write_node_config(home / "node-config.toml", values)),
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--superexec-auth-secret-file",
        str(home / "runtime.secret"),
    ]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += [
            "--root-certificates",
            str(args.ca.resolve()),
            "--auth-supernode-private-key",
            str(args.key.resolve()),
        ]
    env = child_env(home)
    runner = start_runner(home, f"127.0.0.1:{runtime_port}", env)
    log.info("site %s: connecting to %s:%d (data %s stays here)", name, host, port, data)
    try:
        return run_supernode(cmd, env, args.wait, ServerWatch(name, args.linger))
    finally:
        stop_process(runner, grace=5.0)


if __name__ == "__main__":
    sys.exit(main())
