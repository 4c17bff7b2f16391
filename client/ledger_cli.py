"""``fedseal ledger``: read a site's privacy ledger, or recover it deliberately.

::

    fedseal ledger show    --ledger L --ledger-key K --site NAME --epsilon 8 --delta 1e-5
    fedseal ledger recover --ledger L --ledger-key K [--site NAME --epsilon 8 --delta 1e-5]

``show`` verifies the ledger (MAC, counter) and prints each job's spend and
the site's totals, epsilon and delta. ``recover`` is for after a refusal
that said the ledger is an older copy or is gone: it accepts the copy that
is there (or starts an empty one) and carries forward the totals the counter
remembers, so the recorded spend never goes down.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedseal.client.ledger import LedgerError, PrivacyLedger, recover


def summary(ledger: PrivacyLedger) -> dict:
    """Each job's (epsilon, delta, steps) and the site's totals, as printed by ``show``."""
    jobs = sorted({e.run for e in ledger.entries})
    return {
        "site": ledger.site, "budget": {"epsilon": ledger.target_epsilon, "delta": ledger.delta},
        "jobs": {j: {"epsilon": ledger.epsilon_spent(j), "delta": ledger.delta_spent(j),
                     "steps": ledger.steps_done(j)} for j in jobs},
        "total": {"epsilon": ledger.epsilon_spent(), "delta": ledger.delta_spent()},
        "writes": ledger.seq,
    }


def add_ledger_files(parser: argparse.ArgumentParser) -> None:
    """``--ledger`` and ``--ledger-key``, shared by ``fedseal client`` and ``fedseal ledger``."""
    parser.add_argument("--ledger", type=Path, required=True, metavar="FILE",
                        help="this site's privacy ledger (created by fedseal client on first "
                             "use; keep it)")
    parser.add_argument("--ledger-key", type=Path, required=True, metavar="FILE",
                        help="the ledger's key and counter (made with the ledger); keep it in "
                             "another folder than the ledger, outside the ledger's backups")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The action and options of ``fedseal ledger``."""
    parser.add_argument("action", choices=("show", "recover"),
                        help="show: verify the ledger and print its spend; recover: accept the "
                             "ledger there is (or start an empty one) after a refusal")
    add_ledger_files(parser)
    parser.add_argument("--site", help="the site's name (required by show; by recover when the "
                                       "ledger is gone)")
    parser.add_argument("--epsilon", type=float,
                        help="the site's total budget epsilon, as given to fedseal client "
                             "(required by show; by recover when the ledger is gone)")
    parser.add_argument("--delta", type=float,
                        help="the site's budget delta, in (0, 1), as given to fedseal client "
                             "(required by show; by recover when the ledger is gone)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal ledger``; 2 on a refused ledger."""
    from fedseal.common.cli import command_parser

    parser = command_parser("ledger")
    args = parser.parse_args(argv)
    try:
        if args.action == "recover":
            ledger = recover(args.ledger, args.ledger_key, args.site, args.epsilon, args.delta)
        else:
            if args.site is None or args.epsilon is None or args.delta is None:
                parser.error("show needs --site, --epsilon and --delta (as given to fedseal client)")
            if not args.ledger.exists():
                raise LedgerError(f"there is no ledger at {args.ledger}")
            ledger = PrivacyLedger.open(args.ledger, args.site, args.epsilon, args.delta,
                                        key_path=args.ledger_key)
    except LedgerError as exc:
        print(f"fedseal ledger: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary(ledger), indent=2))
    return 0


__all__ = ["add_arguments", "add_ledger_files", "main", "summary"]
