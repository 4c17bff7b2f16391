"""What every benchmark does at its edges: log lines while it runs, one JSON report at the end."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any


def setup_bench_logging(level: str) -> None:
    """Timestamped log lines on stderr (replacing handlers libraries may have installed)."""
    logging.basicConfig(
        level=level.upper(), force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def emit_report(report: dict[str, Any], path: Path, *, quiet: bool = False) -> None:
    """Write ``report`` as indented JSON to ``path`` and print it (unless ``quiet``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    path.write_text(text + "\n", encoding="utf-8")
    if not quiet:
        print(text)


def finish(
    report: dict[str, Any],
    started: float,
    json_path: Path,
    plot_path: Path | None,
    plot: Callable[[dict[str, Any], Path], None],
) -> int:
    """A benchmark's last steps: its wall time since ``started`` (``time.monotonic``), the plot
    when asked for, the JSON written and printed; the exit status."""
    import time

    report["wall_seconds"] = round(time.monotonic() - started, 1)
    if plot_path:
        plot(report, plot_path)
        report["plot"] = str(plot_path)
    emit_report(report, json_path)
    return 0
