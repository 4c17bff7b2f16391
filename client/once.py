"""Things a site does at most once per (job, round), remembered across restarts.

A site helps unmask a round once (:mod:`fedseal.client.secagg`) and scores a
round's model once (federated evaluation, :mod:`fedseal.client.app`). A server
that restarts, or pretends to, gets a fresh Flower ``Context``, so the record
lives in a file beside the site's ledger. Without a ledger (a simulation) it
lives in the context's state.

The file is JSON, ``{"format": FORMAT, "version": 1, "rounds": [[job, round], ...]}``
with the rounds sorted (known-answer test in ``tests/test_once.py``). A file
that cannot be read refuses the action until it is restored: never "forgotten".
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedseal.common.durable import atomic_write
from fedseal.common.errors import FedsealError

Round = tuple[str, int]


class OnceError(FedsealError, RuntimeError):
    """The record of what a site did once per round is unreadable or unwritable."""

    code = "once.error"


def record_path(ledger_path: Path, suffix: str) -> Path:
    """The record's file beside the site's ledger (``<ledger><suffix>``)."""
    return ledger_path.with_name(ledger_path.name + suffix)


def encode(fmt: str, rounds: set[Round]) -> bytes:
    """The record file's bytes (a fixed format: see the module docstring)."""
    return json.dumps({"format": fmt, "version": 1, "rounds": sorted([job, r] for job, r in rounds)}).encode(
        "utf-8"
    )


def done(context: Context, fmt: str, path: Path | None) -> set[Round]:
    """The (job, round) pairs recorded under ``fmt``: from ``path``, or the context without one.

    Raises
    ------
    OnceError
        If the file exists but is not a record of ``fmt``.
    """
    if path is None:
        rec = context.state.config_records[fmt] if fmt in context.state else ConfigRecord()
        return {(str(j), int(r)) for j, r in (json.loads(str(v)) for v in rec.values())}
    if not path.exists():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != fmt:
            raise ValueError(f"format {data.get('format')!r}")
        return {(str(j), int(r)) for j, r in data["rounds"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OnceError(
            f"this site's record {path} is unreadable ({exc}); restore it from a backup"
        ) from None


def remember(context: Context, fmt: str, path: Path | None, rounds: set[Round]) -> None:
    """Record ``rounds`` (all of them: the old set plus the new pair), durably when ``path``."""
    if path is None:
        context.state[fmt] = ConfigRecord({f"{j}/{r}": json.dumps([j, r]) for j, r in rounds})
        return
    try:
        atomic_write(path, encode(fmt, rounds))
    except OSError as exc:
        raise OnceError(f"cannot write this site's record {path} ({exc})") from None


__all__ = ["OnceError", "Round", "done", "encode", "record_path", "remember"]
