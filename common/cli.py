"""``fedseal``: one command, a subcommand per role.

The subcommands live with the role they belong to (``simulations``, ``server``,
``client``); this dispatcher imports the chosen one by name only when it runs,
so ``common`` keeps no import-time dependency on them. Each command module
defines ``add_arguments(parser)``; :func:`command_parser` builds its parser from
it, and :func:`build_parser` the whole tree (every command imported).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from fedseal.common.config import ConfigError

COMMANDS = {
    "simulate": ("fedseal.simulations.simulate", "run the whole federation on this machine"),
    "keys": (
        "fedseal.server.keys_cli",
        "create the federation's certificates (server) or a site's key (site)",
    ),
    "server": ("fedseal.server.launch", "run the aggregation server (SuperLink) and one federated run"),
    "client": ("fedseal.client.agent", "run the client agent (SuperNode) at a data site"),
    "ledger": (
        "fedseal.client.ledger_cli",
        "show a site's privacy ledger, raise its total, or recover it deliberately",
    ),
    "report": ("fedseal.server.report_cli", "write a run's report page (RUN_DIR/report.html)"),
    "audit": (
        "fedseal.simulations.audit",
        "measure what one site's replies reveal about a planted record, against its budget",
    ),
}


class Parser(argparse.ArgumentParser):
    """An argument parser whose "unrecognized arguments" error names the closest option."""

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            known = [o for o in self._option_string_actions if o.startswith("--")]
            hints = []
            for word in message[len(prefix) :].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                if word.startswith("-") and close:
                    hints.append(f"{word.split('=')[0]} -> {close[0]}")
            if hints:
                message += f" (did you mean {', '.join(hints)}?)"
        super().error(message)


def fedseal_version() -> str:
    """The installed fedseal's version (``unknown`` for a checkout that was never installed)."""
    try:
        return version("fedseal")
    except PackageNotFoundError:
        return "unknown"


def _describe(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(COMMANDS[name][0])
    parser.description = module.__doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    module.add_arguments(parser)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``fedseal <name>``, as that command's ``main`` uses it."""
    return _describe(Parser(prog=f"fedseal {name}"), name)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``fedseal`` parser: one subparser per command, with all its options."""
    parser = Parser(prog="fedseal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", parser_class=Parser)
    for name, (_, text) in COMMANDS.items():
        _describe(sub.add_parser(name, help=text), name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``fedseal <command> ...``; user errors exit 2 with one clear line.

    Output cut short by its reader (``fedseal -h | head``) ends quietly, as in
    any Unix tool, instead of a ``BrokenPipeError`` traceback.
    """
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would flush into the closed pipe at exit
        return 0


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fedseal <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        print("\n`fedseal <command> --help` lists a command's options; `fedseal --version` the version.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"fedseal {fedseal_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(
            f"fedseal: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except (ConfigError, ValueError, FileNotFoundError, TimeoutError) as exc:
        print(f"fedseal {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
