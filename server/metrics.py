"""One JSON line per round in ``<out>/metrics.jsonl``, and the progress line on screen."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedseal.common.durable import atomic_write

log = logging.getLogger("fedseal")

NON_PRIVATE = "NON-PRIVATE (--no-dp): these results carry no differential-privacy guarantee"


class MetricsLog:
    """Appends one JSON object per completed round, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line and make it durable."""
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file by ``rows`` atomically; an older file is kept as ``.prev``.

        A fresh run starts from ``[]``; a resumed one from its checkpoint's rows.
        """
        if self.path.exists() and self.rows() != rows:
            os.replace(self.path, self.path.with_name(self.path.name + ".prev"))
        atomic_write(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def rows(self) -> list[dict[str, Any]]:
        """All rows written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


def eta_seconds(rows: list[dict[str, Any]], rounds: int) -> float:
    """Seconds left: the mean round time of ``rows`` times the rounds still to run."""
    if not rows:
        return float("nan")
    return sum(r["seconds"] for r in rows) / len(rows) * max(0, rounds - rows[-1]["round"])


def progress_line(
    row: dict[str, Any], rounds: int, epsilon_target: float, private: bool, eta: float | None = None
) -> str:
    """A compact human summary of one round; ``eta`` (seconds left) is shown when given."""
    bar_len = 20
    done = int(bar_len * row["round"] / rounds)
    bar = "#" * done + "." * (bar_len - done)
    eps = row.get("epsilon") or {}
    eps_txt = (
        f"eps max {max(eps.values()):.2f}/{epsilon_target:g}"
        if private and eps
        else ("eps n/a" if private else "NON-PRIVATE")
    )
    acc = row.get("accuracy")
    acc_txt = f"acc {acc:.3f}" if acc is not None else "acc -"
    eta_txt = "" if eta is None or eta != eta else f" | ETA {_duration(eta)}"
    late = len(row.get("timed_out") or ())
    late_txt = f" | {late} timed out (raise --timeout?)" if late else ""
    return (
        f"[{bar}] round {row['round']}/{rounds} | {acc_txt} | loss {row.get('loss', float('nan')):.4f} "
        f"| {eps_txt} | sites {len(row.get('contributors', []))}{late_txt} | "
        f"{row['seconds']:.1f}s{eta_txt}"
    )


def round_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The per-round numbers of a metrics row, by TensorBoard tag.

    ``eval/*`` scores on the held-out file, ``privacy/*`` epsilon (the maximum
    and each site's), ``sites/*`` how many sites contributed, refused, failed.
    """
    scalars = {
        f"eval/{key}": float(row[key])
        for key in ("accuracy", "loss", "macro_f1")
        if isinstance(row.get(key), (int, float))
    }
    eps = row.get("epsilon") or {}
    if eps:
        scalars["privacy/epsilon_max"] = float(max(eps.values()))
        scalars.update({f"privacy/epsilon/{site}": float(value) for site, value in eps.items()})
    for key in ("contributors", "refused", "failed"):
        scalars[f"sites/{key}"] = float(len(row.get(key) or ()))
    return scalars


class TensorBoardLog:
    """The per-round scalars of ``metrics.jsonl``, also as TensorBoard events.

    Events go to ``directory`` (``tensorboard --logdir DIR`` shows them), one
    step per round. ``first_round`` is the first round this process logs: a
    resumed run hides whatever an interrupted process logged from that round on,
    so each round appears once.
    """

    def __init__(
        self, directory: str | Path, *, first_round: int, private: bool, settings: dict[str, Any]
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard only when asked for

        self.writer = SummaryWriter(log_dir=str(directory), purge_step=first_round)
        if not private:
            self.writer.add_text("privacy", NON_PRIVATE, global_step=first_round)
        self.writer.add_text(
            "settings", "```\n" + json.dumps(settings, indent=2) + "\n```", global_step=first_round
        )

    def append(self, row: dict[str, Any]) -> None:
        """Log ``row``'s scalars at step ``row["round"]`` and flush them to disk."""
        for tag, value in round_scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["round"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
