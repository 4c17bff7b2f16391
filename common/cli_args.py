"""Command-line options generated from :class:`common.config.FedConfig`.

Every config field becomes an option (``lora_r`` -> ``--lora-r``; booleans get
``--dp/--no-dp``), so the CLI, TOML files and Flower's run config can never
drift apart. Precedence: defaults < ``--config FILE`` < explicit options.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

from common.config import FIELDS, FedConfig, from_mapping, load_toml


def add_config_options(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Add ``--config`` and one option per config field (except ``skip``)."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (same names as the options)")
    group = parser.add_argument_group("run settings (defaults shown)")
    for name, fld in FIELDS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = fld.default
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"default: {default}")
        elif isinstance(default, tuple):
            group.add_argument(flag, metavar="A,B,...", default=None,
                               help=f"comma-separated; default: {','.join(default) or '(none)'}")
        else:
            group.add_argument(flag, metavar=type(default).__name__.upper(), default=None,
                               help=fld.metadata.get("help", f"default: {default!r}"))


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
    """Readable log lines on stderr for the CLIs."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False  # flwr prints through its own handler
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
