"""The console of ``fedseal simulate``: quiet by default, everything in ``<out>/fedseal.log``.

A tiny federation (tiny random BERT, 2 sites, 2 rounds, a few hundred examples)
runs through the real CLI and Flower's Ray engine in a child process; the test
reads what a user would see on the terminal (stdout and stderr together). What
``-v`` brings back is checked on the libraries' own loggers in a child process,
without a second Ray run (about a minute on 2 cores each).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedseal.common.console import ConsoleFilter
from fedseal.common.data import write_examples
from fedseal.common.synthetic import synthetic_examples
from fedseal.server.metrics import eta_seconds, progress_line

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
PROGRESS = re.compile(rf"^\[[#.]+\] round (\d+)/{ROUNDS} \|.*\| ETA \S+$", re.MULTILINE)
# What the default console must never show: other projects' lines.
NOISE = {
    "Ray": re.compile(r"\bray", re.IGNORECASE),  # ray, Ray's, raylet (not "array")
    "alembic": re.compile("alembic", re.IGNORECASE),
    "transformers": re.compile("transformers", re.IGNORECASE),
    "a Ray actor's output": re.compile(re.escape("(ClientAppActor")),
    "a progress bar": re.compile("Loading weights|Writing model shards"),
    "a Python warning": re.compile(r"[A-Za-z]*Warning:"),
    "Flower's deprecation banner": re.compile("DEPRECATED", re.IGNORECASE),
}


def test_eta_is_the_mean_round_time_times_the_rounds_left():
    rows = [{"round": 1, "seconds": 30.0}, {"round": 2, "seconds": 50.0}]
    assert eta_seconds(rows, 5) == 120.0
    assert eta_seconds(rows, 2) == 0.0
    row = {**rows[1], "accuracy": 0.5, "loss": 0.7, "epsilon": {}, "contributors": [1, 2]}
    assert progress_line(row, 5, 8.0, True, eta=eta_seconds(rows, 5)).endswith("| 50.0s | ETA 2m00s")
    assert "ETA" not in progress_line(row, 5, 8.0, True)


@pytest.mark.parametrize(
    "name,level,shown",
    [
        ("fedseal", logging.INFO, True),  # header and progress lines
        ("fedseal", logging.DEBUG, False),
        ("fedseal.run", logging.INFO, False),  # per-round detail: the log file
        ("fedseal.run", logging.WARNING, True),
        ("fedseal.client.app", logging.WARNING, True),
        ("fedseal.common.secagg.server", logging.INFO, False),
        ("flwr", logging.WARNING, False),  # Flower's deprecation notice
        ("py.warnings", logging.WARNING, False),  # libraries' FutureWarnings
        ("alembic.runtime.plugins", logging.INFO, False),
        ("flwr", logging.ERROR, True),  # anyone's error
    ],
)
def test_console_filter_shows_fedseal_lines_and_warnings_only(name, level, shown):
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    assert ConsoleFilter().filter(record) is shown


def _simulate(tiny_bert: str, out: Path, *extra: str) -> str:
    """Run ``fedseal simulate`` on small files; return its console (stdout + stderr)."""
    data = out.parent / "data"
    train = write_examples(synthetic_examples(240, seed=1), data / "train.jsonl")
    held_out = write_examples(synthetic_examples(64, seed=2), data / "eval.jsonl")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseal.common.cli",
            "simulate",
            "--model",
            tiny_bert,
            "--finetune",
            "probe",
            "--clients",
            "2",
            "--rounds",
            str(ROUNDS),
            "--max-length",
            "16",
            "--train",
            str(train),
            "--eval",
            str(held_out),
            "--out",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_default_console_is_header_progress_and_nothing_else(tiny_bert, tmp_path):
    """Header, one progress line per round with its ETA, the summary; detail in the log file."""
    out = tmp_path / "run"
    console = _simulate(tiny_bert, out)
    log_file = out / "fedseal.log"
    assert console.startswith("fedseal simulate: "), console
    assert "epsilon 8, delta 1e-05 per site" in console and "SecAgg+) on" in console
    assert f"log: {log_file}" in console
    assert [int(r) for r in PROGRESS.findall(console)] == list(range(1, ROUNDS + 1)), console
    assert f"metrics          {out / 'metrics.jsonl'}" in console
    for what, pattern in NOISE.items():
        assert not pattern.search(console), f"{what} on the console:\n{console}"
    detail = log_file.read_text(encoding="utf-8")
    assert "DEPRECATED FEATURE" in detail  # Flower's notice, kept, in the file
    assert "fedseal.simulate:   site-1:" in detail  # each site's label mix
    assert f"fedseal.run: round {ROUNDS}/{ROUNDS}: 2 site(s) training" in detail
    assert "fedseal.common.secagg.server: unmask stage" in detail
    assert len(re.findall(r"INFO fedseal: \[[#.]+\] round", detail)) == ROUNDS


# Each library logs as it does in a run: Flower's banner, Ray's driver logger,
# alembic at import, transformers, a Python warning, fedseal's per-round detail.
LIBRARY_LINES = """
import logging, sys, warnings
from pathlib import Path
from fedseal.common.console import setup_run_logging
setup_run_logging(Path(sys.argv[1]), verbose=sys.argv[2] == "-v")
from flwr.supercore.logger import warn_deprecated_feature
from transformers.utils import logging as hf_logging
warn_deprecated_feature("The `run_simulation` function is deprecated")
logging.getLogger("ray").warning("ray: object store is using /tmp")
logging.getLogger("alembic.runtime.plugins").info("alembic: setup plugin")
hf_logging.get_logger("transformers.modeling_utils").warning("transformers: some weights are new")
warnings.warn("a FutureWarning from a library", FutureWarning)
logging.getLogger("fedseal.run").info("round 1/2: 2 site(s) training")
logging.getLogger("fedseal").info("the progress line")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_puts_every_library_line_back_on_the_console(tmp_path, verbose):
    """``-v``: Flower's, Ray's, alembic's, transformers' lines and warnings reach the console.

    The libraries' real loggers, in a child process (the routing changes its
    global logging); both ways the log file holds every line.
    """
    log_file = tmp_path / "fedseal.log"
    proc = subprocess.run(
        [sys.executable, "-c", LIBRARY_LINES, str(log_file), "-v" if verbose else ""],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    lines = (
        "DEPRECATED FEATURE",
        "ray: object store",
        "alembic: setup plugin",
        "transformers: some weights",
        "FutureWarning",
        "round 1/2: 2 site(s) training",
    )
    detail = log_file.read_text(encoding="utf-8")
    assert all(line in detail for line in lines), detail
    assert "the progress line" in proc.stdout
    assert [line for line in lines if line in proc.stdout] == (list(lines) if verbose else []), proc.stdout
