"""``fedseal keys``: the command-line face of :mod:`server.keys`."""

from __future__ import annotations

import argparse
import sys

from server import keys as keys_lib
from server.keys import (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, SITES_DIR, Hosts, KeysError,
                         KeysResult, init_keys, parse_hosts, parse_sites)


def _print_next_steps(result: KeysResult, hosts: Hosts | None) -> None:
    out = result.out.resolve()
    for path in result.created:
        print(f"created {path}")
    for path in result.kept:
        print(f"kept    {path}")
    host = hosts.first() if hosts else "<server-host>"
    print(f"""
Next steps (Flower 1.41; one HTTPS port serves the Fleet, Control and Runtime APIs):
  on the server (flower-superexec must be on PATH, e.g. the venv activated):
    flower-superlink --ssl-ca-certfile {out / CA_CERT} --ssl-certfile {out / SERVER_CERT} \\
      --ssl-keyfile {out / SERVER_KEY} --enable-supernode-auth --database <state.db> \\
      --host 0.0.0.0 --port 9093 --disable-runtime-dependency-installation
  register each site (in $FLWR_HOME/config.toml, default ~/.flwr/config.toml:
    [superlink.fedseal] address = "{host}:9093", root-certificates = "{out / CA_CERT}"):""")
    for name in result.sites:
        print(f"    flwr supernode register {out / SITES_DIR / name}.pub fedseal --name {name}")
    print(f"""  at each site, with only ca.pem and its own key:
    flower-supernode --superlink {host}:9093 --root-certificates ca.pem \\
      --auth-supernode-private-key <site>.key --node-config 'data-path="..." epsilon=8.0'
Move {out / CA_KEY} offline: it is only needed to issue a new server certificate.""")


def main(argv: list[str] | None = None) -> int:
    """``fedseal keys init ...``; returns the process exit code (2 on a user error)."""
    parser = argparse.ArgumentParser(prog="fedseal keys",
                                     description="Create the TLS certificates and SuperNode "
                                                 "keys of a federation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="init")
    init = sub.add_parser("init", help="create (or add sites to) a federation's keys",
                          description=keys_lib.__doc__.split("\n\n")[1])
    init.add_argument("--out", required=True, metavar="DIR", help="folder for the keys")
    init.add_argument("--server-host", action="append", metavar="HOST[,IP...]",
                      help="names and IP addresses of the SuperLink, comma-separated "
                           "(required the first time)")
    init.add_argument("--sites", action="append", required=True, metavar="A,B,C",
                      help="site names: letters, digits, '-' and '_'")
    init.add_argument("--days", type=int, default=365, help="server certificate validity (days)")
    init.add_argument("--ca-days", type=int, default=3650, help="CA certificate validity (days)")
    init.add_argument("--force", action="store_true",
                      help="replace existing keys and certificates instead of refusing")
    args = parser.parse_args(argv)
    try:
        hosts = parse_hosts(args.server_host) if args.server_host else None
        result = init_keys(args.out, parse_sites(args.sites), hosts, force=args.force,
                           days=args.days, ca_days=args.ca_days)
    except (KeysError, OSError) as exc:
        print(f"fedseal keys: error: {exc}", file=sys.stderr)
        return 2
    _print_next_steps(result, hosts)
    return 0


__all__ = ["main"]
