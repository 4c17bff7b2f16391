"""Whether a finished run produced anything: one rule for the server, the simulation and the report.

A run fails when no round had a contribution (every site refused or failed), or
when more than :data:`MAX_ABANDONED` of its training rounds were abandoned (the
model is then untrained or barely trained). A failed run still writes its
metrics, summary, model and report, so the operator can see why; the summary's
``failed`` field holds the reason, and ``fedseal server`` / ``fedseal simulate``
exit 1 and lead their output with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_ABANDONED = 0.5
"""The largest fraction of training rounds that may be abandoned in a run that counts."""


def run_failure(rows: Sequence[Mapping[str, Any]], statistics_rounds: int) -> str | None:
    """Why the run with metrics ``rows`` failed, or ``None`` if it produced a model.

    Parameters
    ----------
    rows
        The run's ``metrics.jsonl`` lines (``round``, ``contributors``, ``abandoned``).
    statistics_rounds
        How many rounds at the start only estimate statistics
        (:func:`fedseal.common.dp_rule.stats_rounds`); the rest train.
    """
    if not rows:
        return "no round ran"
    if not any(row.get("contributors") for row in rows):
        return (
            "no site contributed to any round: every site refused or failed (the report's "
            "Rounds table says why, site by site)"
        )
    training = [row for row in rows if row["round"] > statistics_rounds]
    lost = [row for row in training if row.get("abandoned")]
    if training and len(lost) > MAX_ABANDONED * len(training):
        state = "untrained" if len(lost) == len(training) else "barely trained"
        return (
            f"{len(lost)} of {len(training)} training rounds were abandoned (more than "
            f"{MAX_ABANDONED:.0%}), so the model is {state}; the first: "
            f"{lost[0]['abandoned']}"
        )
    return None


__all__ = ["MAX_ABANDONED", "run_failure"]
