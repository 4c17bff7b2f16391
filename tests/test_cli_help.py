"""Every option of every ``fedseal`` command explains itself in ``--help``.

The walk goes over the real parser tree (:func:`fedseal.common.cli.build_parser`, the same
``add_arguments`` each command's ``main`` uses), so an option added without a help
text, or a choice-valued option whose help does not name its choices, fails here.
"""

from __future__ import annotations

import argparse
import re

import pytest

from fedseal.common.cli import COMMANDS, build_parser, command_parser
from fedseal.common.config import AUTO, AUTO_SETTINGS, CHOICES, FIELDS, HELP


def _walk(parser: argparse.ArgumentParser, path: str):
    """Yield ``(command path, action)`` for every option of ``parser`` and its subparsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


OPTIONS = list(_walk(build_parser(), "fedseal"))


def test_the_walk_reaches_every_command_and_nested_subcommand():
    commands = {path for path, _ in OPTIONS}
    assert {f"fedseal {name}" for name in COMMANDS if name != "keys"} <= commands
    assert {"fedseal keys init", "fedseal keys site", "fedseal keys add-site"} <= commands
    simulate = {_name(a) for path, a in OPTIONS if path == "fedseal simulate"}
    assert {"--secagg-k", "--server-lr", "--partition", "--dp/--no-dp"} <= simulate


@pytest.mark.parametrize("path,action", OPTIONS, ids=[f"{p} {_name(a)}" for p, a in OPTIONS])
def test_every_option_has_a_help_text_naming_its_choices(path, action):
    text = (action.help or "").strip()
    assert text and action.help is not argparse.SUPPRESS, f"{path} {_name(action)} has no help text"
    for choice in action.choices or ():
        assert re.search(rf"\b{re.escape(str(choice))}\b", text), (
            f"{path} {_name(action)}: help {text!r} does not name the allowed value {choice!r}"
        )


def test_help_texts_live_beside_the_config_fields_one_per_setting():
    assert set(HELP) == set(FIELDS)
    for name, allowed in CHOICES.items():
        assert all(value in HELP[name] for value in allowed), name
    for name in AUTO_SETTINGS:
        assert f"or {AUTO}:" in HELP[name], f"{name}: help does not say what auto means"


def test_simulate_help_shows_auto_for_every_automatic_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        command_parser("simulate").parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in AUTO_SETTINGS:
        flag = "--" + name.replace("_", "-")
        assert f"{flag} auto|" in out, f"{flag} does not show that it takes auto"
    assert out.count("(default: auto)") >= len(AUTO_SETTINGS)
    assert "--eval-max-examples all|INT" in out and "or all: the whole file (default: all)" in out
    assert (
        "server-lr auto|FLOAT server learning rate (positive number) or auto: 1.0 for "
        "fedavg, 0.01 for fedadam (default: auto)" in out
    )


def test_auto_and_numbers_parse_on_the_command_line():
    from fedseal.common.cli_args import config_from_args

    parser = command_parser("simulate")
    args = parser.parse_args(["--secagg-k", "auto", "--server-lr", "auto"])
    cfg = config_from_args(args)
    assert (cfg.secagg_k, cfg.server_lr) == (AUTO, AUTO)
    cfg = config_from_args(
        parser.parse_args(
            ["--clients", "10", "--secagg-k", "4", "--server-lr", "0.5", "--secagg-threshold", "AUTO"]
        )
    )
    assert (cfg.secagg_k, cfg.server_lr, cfg.secagg_threshold) == (4, 0.5, AUTO)


@pytest.mark.parametrize(
    "argv,named",
    [
        (
            ["--secagg-k", "fast"],
            "argument --secagg-k: secagg-k must be 'auto' or a positive integer, got 'fast'",
        ),
        (
            ["--secagg-k", "0"],
            "argument --secagg-k: secagg-k must be 'auto' or a positive integer, got "
            "'0'; for the automatic choice write auto",
        ),
        (
            ["--server-lr", "fast"],
            "argument --server-lr: server-lr must be 'auto' or a positive number, got 'fast'",
        ),
        (
            ["--strategy", "fedsgd"],
            "argument --strategy: invalid choice: 'fedsgd' (choose from 'fedavg', 'fedadam')",
        ),
        (["--rounds", "many"], "argument --rounds: rounds must be an integer, got 'many'"),
    ],
)
def test_a_typo_names_the_option_and_its_allowed_values(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_:
        command_parser("simulate").parse_args(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_client_runtime_port_is_auto_or_a_port(capsys):
    required = ["--server", "h:1", "--data", "d", "--ledger", "l", "--ledger-key", "k"]
    parser = command_parser("client")
    assert parser.parse_args(required).runtime_port == AUTO
    assert parser.parse_args([*required, "--runtime-port", "9999"]).runtime_port == 9999
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--runtime-port", "0"])
    assert (
        "argument --runtime-port: must be auto or a port number 1-65535, got '0'" in capsys.readouterr().err
    )


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "1e300", "soon"])
def test_client_reply_hold_is_a_number_of_seconds(capsys, bad):
    required = ["--server", "h:1", "--data", "d", "--ledger", "l", "--ledger-key", "k"]
    parser = command_parser("client")
    assert parser.parse_args(required).reply_hold == 0.0
    assert parser.parse_args([*required, "--reply-hold", "30"]).reply_hold == 30.0
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--reply-hold", bad])
    assert (
        f"argument --reply-hold: must be a number of seconds from 0 to 86400, got '{bad}'"
        in capsys.readouterr().err
    )
