"""``fedseal report RUN_DIR``: write the run's self-contained report page.

Every simulation and server run writes ``RUN_DIR/report.html`` when it ends;
this command writes it again (or for a run still going on, from the rounds
completed so far). Open the file in any browser: it needs no network.
"""

from __future__ import annotations

import argparse
import sys

from fedseal.server.report import REPORT_FILE, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedseal report``."""
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's output folder (its --out), holding metrics.jsonl"
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help=f"where to write the page (default: RUN_DIR/{REPORT_FILE})"
    )
    parser.add_argument(
        "--audit", metavar="FILE", help="a fedseal audit result (its --json FILE) to show in the page"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal report``."""
    from fedseal.common.cli import command_parser

    args = command_parser("report").parse_args(argv)
    print(write_report(args.run_dir, args.output, args.audit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
