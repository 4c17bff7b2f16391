"""Command-line options generated from :class:`fedseal.common.config.FedConfig`.

Every config field becomes an option (``lora_r`` -> ``--lora-r``; booleans get
``--dp/--no-dp``), so the CLI, TOML files and Flower's run config can never
drift apart. Each option's help is the field's entry in :data:`fedseal.common.config.HELP`
plus its default; choice-valued fields take argparse ``choices`` from
:data:`fedseal.common.config.CHOICES`. Precedence: defaults < ``--config FILE`` <
explicit options.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fedseal.common.config import (
    CHOICES,
    FIELDS,
    HELP,
    WORD_SETTINGS,
    ConfigError,
    FedConfig,
    from_mapping,
    load_toml,
    parse_setting,
)


def add_config_options(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Add ``--config`` and one option per config field (except ``skip``)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with settings, same names as the options (lora_r = 16 or "
        "lora-r = 16); options given on the command line win",
    )
    group = parser.add_argument_group("run settings")
    for name, fld in FIELDS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = fld.default
        text = f"{HELP[name]} (default: {_shown(default)})".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name in CHOICES:
            group.add_argument(flag, choices=CHOICES[name], default=None, help=text)
        else:
            group.add_argument(
                flag, metavar=_metavar(name, default), type=_setting_type(name), default=None, help=text
            )


def _shown(default: Any) -> str:
    """A default as the help shows it."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(default) or "empty"
    return str(default) if default != "" else "empty"


def _metavar(name: str, default: Any) -> str:
    if isinstance(default, tuple):
        return "A,B,..."
    if name in WORD_SETTINGS:
        word, kind = WORD_SETTINGS[name]
        return f"{word}|{kind.__name__.upper()}"
    return type(default).__name__.upper()


def _setting_type(name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that checks a value as :func:`fedseal.common.config.parse_setting` does."""

    def parse(text: str) -> Any:
        try:
            return parse_setting(name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name.replace("_", "-")
    return parse


def config_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> FedConfig:
    """Merge defaults, the TOML file and explicit options into a validated config."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update({k.replace("-", "_"): v for k, v in load_toml(args.config).items()})
    for name in FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    values.update(overrides or {})
    return from_mapping(values, source=args.config or "the command line")


def setup_logging(verbose: bool = False) -> None:
    """Readable log lines on stderr for the CLIs and the deployed apps' processes.

    A no-op where the root logger already has a handler (a test's, or one a
    library installed on import: Opacus calls ``logging.basicConfig`` in
    ``opacus.utils.module_utils``, which is why the server must not import Opacus:
    its progress lines would not show; ``tests/test_house.py`` checks both).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("flwr").propagate = False  # flwr prints through its own handler
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
