"""The console of a long run: fedseal's own lines on screen, everything in a log file.

By default the console shows what a user reads and acts on: the lines fedseal
logs on the ``fedseal`` logger itself (the run's header, one progress line per
round) and warnings or errors from fedseal's own packages; errors from anyone.
Every log record, from every library (Flower, Ray, alembic, transformers,
Python ``warnings``), goes to the log file. ``verbose`` puts everything back on
the console at debug level.

The routing uses handlers and each library's own switches, never filtering
printed text: Flower's, Ray's and transformers' loggers lose their own console
handlers and propagate to the root logger; Python warnings are captured into
logging. Child processes (Ray's actors, which inherit the environment of the
process that starts Ray) are kept quiet by :func:`quiet_child_environment`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONSOLE_LOGGER = "fedseal"  # its INFO lines are the quiet console
LOG_FILE = "fedseal.log"
DETAIL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Read by huggingface_hub and transformers when they are imported: no download,
# "Loading weights" or "Writing model shards" bars (they are not log lines).
QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class ConsoleFilter(logging.Filter):
    """Pass what the quiet console shows; the log file gets every record regardless."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True for ``fedseal`` INFO lines, fedseal's warnings, and anyone's errors."""
        if record.levelno >= logging.ERROR:
            return True
        if record.name == CONSOLE_LOGGER:
            return record.levelno >= logging.INFO
        return record.levelno >= logging.WARNING and record.name.split(".", 1)[0] == CONSOLE_LOGGER


class ConsoleFormatter(logging.Formatter):
    """Plain text for progress lines; the level in front of warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        """The message, prefixed by ``WARNING:``/``ERROR:`` when it is one."""
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def setup_run_logging(log_file: Path, verbose: bool = False) -> Path:
    """Send every log record to ``log_file`` and the quiet selection to stderr.

    With ``verbose``, stderr gets every record at debug level as well. Returns
    the log file's path (its folder is created; an older file is replaced, as
    a simulation's other outputs are).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    to_file.setFormatter(logging.Formatter(DETAIL_FORMAT, datefmt="%H:%M:%S"))
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setFormatter(logging.Formatter(DETAIL_FORMAT, datefmt="%H:%M:%S"))
    else:
        console.addFilter(ConsoleFilter())
        console.setFormatter(ConsoleFormatter())
    root.addHandler(to_file)
    root.addHandler(console)
    logging.captureWarnings(True)  # library warnings -> logger "py.warnings" -> the file
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _route_flwr()
    _route_ray()
    _route_transformers(verbose)
    return log_file


def _route_flwr() -> None:
    """Flower's logger keeps its levels but writes through the root handlers."""
    from flwr.supercore.logger import FLOWER_LOGGER, console_handler

    FLOWER_LOGGER.removeHandler(console_handler)
    FLOWER_LOGGER.propagate = True


def _route_ray() -> None:
    """Ray's logger (given its own stderr handler by ``import ray``) writes through the root.

    Ray sets its level from ``ray.init(logging_level=...)`` and keeps this
    logger's handlers otherwise, so its warnings (a small /dev/shm, say) land in
    the log file.
    """
    import ray  # noqa: F401  (installs Ray's handler, which is replaced here)

    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True


def _route_transformers(verbose: bool) -> None:
    """transformers' logger writes through the root handlers; no progress bars unless verbose."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not verbose:
        hf_logging.disable_progress_bar()


def quiet_child_environment(verbose: bool = False) -> None:
    """Set :data:`QUIET_ENVIRONMENT` for the processes this one starts (unless ``verbose``).

    Values the user set already are kept.
    """
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
