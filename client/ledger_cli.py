"""``fedseal ledger``: read a site's privacy ledger, raise its total, or recover it deliberately.

::

    fedseal ledger show    --ledger L --ledger-key K [--json]
    fedseal ledger raise   --ledger L --ledger-key K --epsilon NEW [--delta NEW] \\
                           --by NAME --reason TEXT
    fedseal ledger recover --ledger L --ledger-key K [--site NAME --epsilon E --delta D]

``show`` verifies the ledger (MAC, counter) and prints a table: each job (its
id, rounds, granted and spent epsilon and delta, last time), the raises of
the total, and the site's total, spent and remaining epsilon and delta;
``--json`` prints the same as JSON. ``raise`` raises the site's total budget
on purpose and records who, when and why in the ledger; ``fedseal client``
must then be started with the new ``--epsilon`` and ``--delta``. ``recover``
is for after a refusal that said the ledger is an older copy, is gone, or has
no counter: it accepts the copy that is there (or starts an empty one) and
carries forward the spend the counter remembers, so the recorded spend never
goes down.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedseal.client.ledger import Budget, LedgerError, PrivacyLedger, recover

ACTIONS = ("show", "raise", "recover")


def summary(ledger: PrivacyLedger) -> dict[str, Any]:
    """What ``show`` prints: each job, the raises, and the site's total, spent and remaining."""
    jobs = []
    for job in ledger.jobs():
        entries = [e for e in ledger.entries if e.run == job]
        granted = ledger.grant_of(job)
        jobs.append(
            {
                "job": job,
                "rounds": len({e.round for e in entries}),
                "steps": ledger.steps_done(job),
                "granted": asdict(Budget(granted.epsilon, granted.delta)) if granted else None,
                "spent": asdict(ledger.spent(job)),
                "last": max([e.time for e in entries] + ([granted.time] if granted else [])),
            }
        )
    left = ledger.remaining()
    return {
        "site": ledger.site,
        "ledger": str(ledger.path),
        "writes": ledger.seq,
        "total": asdict(ledger.total),
        "jobs": jobs,
        "raises": [asdict(r) for r in ledger.raises],
        "spent": asdict(ledger.spent()),
        "held": asdict(ledger.held()),
        "remaining": asdict(Budget(max(left.epsilon, 0.0), max(left.delta, 0.0))),
    }


def _printable(text: str) -> str:
    """``text`` with control characters escaped: job ids come from the server."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(info: dict[str, Any]) -> str:
    """``show``'s text: the jobs as a table, then the raises and the totals."""

    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}g}"

    header = ("job", "rounds", "granted eps", "granted delta", "spent eps", "spent delta", "last")
    rows = [
        (
            _printable(j["job"]),
            str(j["rounds"]),
            num(j["granted"] and j["granted"]["epsilon"], 6),
            num(j["granted"] and j["granted"]["delta"], 4),
            num(j["spent"]["epsilon"], 6),
            num(j["spent"]["delta"], 4),
            j["last"],
        )
        for j in info["jobs"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"site {_printable(info['site'])}: ledger {info['ledger']} (write {info['writes']})", ""]
    if rows:
        for row in [header, *rows]:
            lines.append(
                "  ".join(
                    cell.ljust(w) if i in (0, 6) else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
    else:
        lines.append("no job yet")
    for r in info["raises"]:
        lines.append(
            f"raised {r['time']} by {_printable(r['by'])}: epsilon "
            f"{r['old']['epsilon']:g} -> {r['new']['epsilon']:g}, delta "
            f"{r['old']['delta']:g} -> {r['new']['delta']:g} "
            f"({_printable(r['reason'])})"
        )
    lines.append("")
    for name in ("total", "spent", "held", "remaining"):
        label = {"held": "held by jobs", "remaining": "remaining"}.get(name, name)
        lines.append(f"{label + ':':14s}epsilon {info[name]['epsilon']:.6g}, delta {info[name]['delta']:.4g}")
    if info["remaining"]["epsilon"] <= 0 or info["remaining"]["delta"] <= 0:
        lines.append(
            "nothing is left for new jobs: raise the total on purpose with "
            "`fedseal ledger raise`, or keep this site out of new runs"
        )
    return "\n".join(lines)


def add_ledger_files(parser: argparse.ArgumentParser) -> None:
    """``--ledger`` and ``--ledger-key``, shared by ``fedseal client`` and ``fedseal ledger``."""
    parser.add_argument(
        "--ledger",
        type=Path,
        required=True,
        metavar="FILE",
        help="this site's privacy ledger (created by fedseal client on first use; keep it)",
    )
    parser.add_argument(
        "--ledger-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the ledger's key and counter (made with the ledger); keep it in "
        "another folder than the ledger, outside the ledger's backups",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The action and options of ``fedseal ledger``."""
    parser.add_argument(
        "action",
        choices=ACTIONS,
        help="show: verify the ledger and print its jobs, spend and remaining "
        "budget; raise: raise the site's total budget on purpose (recorded "
        "in the ledger); recover: accept the ledger there is (or start an "
        "empty one) after a refusal",
    )
    add_ledger_files(parser)
    parser.add_argument(
        "--json", action="store_true", help="show: print JSON instead of the table (default: the table)"
    )
    parser.add_argument("--site", metavar="NAME", help="recover: the site's name, when the ledger is gone")
    parser.add_argument(
        "--epsilon",
        type=float,
        help="raise: the new total epsilon over all runs (required); recover: "
        "the site's total epsilon, when the ledger is gone",
    )
    parser.add_argument(
        "--delta",
        type=float,
        help="raise: the new total delta, in (0, 1) (default: unchanged); "
        "recover: the site's total delta, when the ledger is gone",
    )
    parser.add_argument(
        "--by", metavar="NAME", help="raise: who raises the total (a name the site knows; required)"
    )
    parser.add_argument("--reason", metavar="TEXT", help="raise: why (recorded in the ledger; required)")


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each action takes only its own options."""
    allowed = {
        "show": {"json"},
        "raise": {"epsilon", "delta", "by", "reason"},
        "recover": {"site", "epsilon", "delta"},
    }[args.action]
    given = {
        name
        for name in ("json", "site", "epsilon", "delta", "by", "reason")
        if getattr(args, name) not in (None, False)
    }
    if given - allowed:
        parser.error(
            f"{args.action} does not take "
            + ", ".join(f"--{name}" for name in sorted(given - allowed))
            + (": show reads the site and its total from the ledger" if args.action == "show" else "")
        )
    if args.action == "raise" and (args.epsilon is None or not args.by or not args.reason):
        parser.error(
            "raise needs --epsilon NEW, --by NAME and --reason TEXT (and --delta NEW to raise delta)"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal ledger``; 2 on a refused ledger."""
    from fedseal.common.cli import command_parser

    parser = command_parser("ledger")
    args = parser.parse_args(argv)
    _check_options(parser, args)
    try:
        if args.action == "recover":
            ledger = recover(args.ledger, args.ledger_key, args.site, args.epsilon, args.delta)
        else:
            ledger = PrivacyLedger.load(args.ledger, args.ledger_key)
        if args.action == "raise":
            ledger.raise_total(
                args.epsilon, ledger.total.delta if args.delta is None else args.delta, args.by, args.reason
            )
            print(
                f"raised the total of site {ledger.site} to epsilon "
                f"{ledger.total.epsilon:.10g}, delta {ledger.total.delta:.10g}; restart "
                f"fedseal client with --epsilon {ledger.total.epsilon:.10g} --delta "
                f"{ledger.total.delta:.10g}"
            )
    except LedgerError as exc:
        print(f"fedseal ledger: error: {exc}", file=sys.stderr)
        return 2
    info = summary(ledger)
    print(json.dumps(info, indent=2) if args.json else table(info))
    return 0


__all__ = ["ACTIONS", "add_arguments", "add_ledger_files", "main", "summary", "table"]
