"""What every benchmark does at its edges: log lines while it runs, one JSON report at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any


def setup_bench_logging(level: str) -> None:
    """Timestamped log lines on stderr (replacing handlers libraries may have installed)."""
    logging.basicConfig(level=level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def emit_report(report: dict[str, Any], path: Path, *, quiet: bool = False) -> None:
    """Write ``report`` as indented JSON to ``path`` and print it (unless ``quiet``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    path.write_text(text + "\n", encoding="utf-8")
    if not quiet:
        print(text)
