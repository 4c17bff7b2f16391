"""``fedseal keys``: the command-line face of :mod:`fedseal.server.keys`."""

from __future__ import annotations

import argparse
import sys

from fedseal.server import keys as keys_lib
from fedseal.server.keys import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    KeysError,
    add_site,
    create_site_key,
    init_keys,
    parse_hosts,
)


def _init(args: argparse.Namespace) -> None:
    hosts = parse_hosts(args.server_host) if args.server_host else None
    result = init_keys(args.out, hosts, force=args.force, days=args.days, ca_days=args.ca_days)
    out = result.out.resolve()
    for path in result.created:
        print(f"created {path}")
    for path in result.kept:
        print(f"kept    {path}")
    print(f"""
Next steps:
  give {out / CA_CERT} to every site (it is public);
  move {out / CA_KEY} offline: it is only needed to issue a new server certificate;
  {out / SERVER_CERT} and {out / SERVER_KEY} stay on the server;
  each site makes its own key (`fedseal keys site --name NAME --out DIR`) and sends
  you NAME.pub; admit it with
    fedseal keys add-site --out {out} --name NAME --pub NAME.pub""")


def _site(args: argparse.Namespace) -> None:
    key, pub = create_site_key(args.out, args.name, force=args.force)
    print(f"""created {key.resolve()} (private: it never leaves this site)
created {pub.resolve()}

Next steps:
  send {pub.name} to the server operator (and to the other sites, for their --peers roster);
  compare its fingerprint over a second channel: ssh-keygen -lf {pub}
  start the agent with --key {key}""")


def _add_site(args: argparse.Namespace) -> None:
    path = add_site(args.out, args.name, args.pub, force=args.force)
    print(
        f"admitted site {args.name}: {path.resolve()}\n"
        "fedseal server registers it with the SuperLink at its next start"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of ``fedseal keys`` (init, site, add-site) and their options."""
    parser.description = keys_lib.__doc__  # the library's docstring explains the key files
    sub = parser.add_subparsers(dest="command", required=True, metavar="init|site|add-site")
    init = sub.add_parser("init", help="on the server: the CA and the server certificate")
    init.add_argument("--out", required=True, metavar="DIR", help="folder for the keys")
    init.add_argument(
        "--server-host",
        action="append",
        metavar="HOST[,IP...]",
        help="names and IP addresses sites use to reach the server, "
        "comma-separated (required the first time)",
    )
    init.add_argument(
        "--days", type=int, default=365, help="server certificate validity, in days (default: %(default)s)"
    )
    init.add_argument(
        "--ca-days", type=int, default=3650, help="CA certificate validity, in days (default: %(default)s)"
    )
    init.add_argument(
        "--force", action="store_true", help="replace the existing CA and certificate instead of refusing"
    )
    init.set_defaults(run=_init)
    site = sub.add_parser("site", help="at a site: this site's own key pair")
    site.add_argument("--name", required=True, help="the site's name: letters, digits, '-', '_'")
    site.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.key and NAME.pub")
    site.add_argument("--force", action="store_true", help="replace an existing key pair")
    site.set_defaults(run=_site)
    add = sub.add_parser("add-site", help="on the server: admit a site's public key")
    add.add_argument("--out", required=True, metavar="DIR", help="the keys folder of `init`")
    add.add_argument("--name", required=True, help="the site's name")
    add.add_argument("--pub", required=True, metavar="FILE", help="the NAME.pub the site sent")
    add.add_argument("--force", action="store_true", help="replace a different key filed for NAME")
    add.set_defaults(run=_add_site)


def main(argv: list[str] | None = None) -> int:
    """``fedseal keys init|site|add-site ...``; returns the process exit code (2 on a user error)."""
    from fedseal.common.cli import command_parser

    args = command_parser("keys").parse_args(argv)
    try:
        args.run(args)
    except (KeysError, OSError) as exc:
        print(f"fedseal keys: error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["add_arguments", "main"]
