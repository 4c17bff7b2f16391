"""A site's persistent record of the privacy budget it has spent.

Flower keeps a ClientApp's ``Context.state`` in the SuperNode's memory: it
survives from one message to the next of a run, but not a restart of the
SuperNode (checked on Flower 1.41: after a restart the same node starts the
run's next round with an empty state). The budget a site has spent must not be
forgotten that way, so each site also keeps this ledger, a small JSON file at
its node config's ``ledger-path``::

    {"version": 1, "site": "hospital-a", "target_epsilon": 8.0, "delta": 1e-05,
     "entries": [{"run": "123", "round": 1, "steps": 20, "epsilon": 0.91,
                  "time": "2026-01-01T12:00:00+00:00"}, ...],
     "checksum": "<sha256 of the canonical JSON of every other field>"}

An entry says: after ``round`` of ``run`` this site had taken ``steps`` DP-SGD
steps in that run, for a cumulative spend of ``epsilon`` in that run. Runs on
the same data compose, so the site's total is the sum over runs of each run's
latest epsilon (see :meth:`PrivacyLedger.epsilon_spent`).

The checksum catches accidental edits and corruption, not an adversary with
write access to the file (who could recompute it). A ledger that fails the
check, or that was created for another budget, is refused; it is never reset
automatically. Every change is written atomically (temporary file, fsync,
``os.replace``, fsync of the folder), so a crash leaves the old or the new
ledger, never a mix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.durable import atomic_write

log = logging.getLogger(__name__)

VERSION = 1
_REL_TOL = 1e-12  # budgets are compared after a JSON round trip, which is exact; be lenient anyway


class LedgerError(RuntimeError):
    """The privacy ledger is unreadable, modified, for another budget, or refuses an entry."""


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded round: cumulative ``steps`` and ``epsilon`` of ``run`` after ``round``."""

    run: str
    round: int
    steps: int
    epsilon: float
    time: str
    noise_multiplier: float = 0.0  # the run's DP plan (0.0: not recorded)
    sample_rate: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in the file."""
        return {"run": self.run, "round": self.round, "steps": self.steps,
                "epsilon": self.epsilon, "time": self.time,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def checksum(body: dict[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON of ``body`` (without its ``checksum``)."""
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "checksum"})).hexdigest()


def _corrupt(path: Path, why: str) -> LedgerError:
    return LedgerError(f"the ledger at {path} was modified or corrupted ({why}); restore it from "
                       "backup; it is never reset automatically")


class PrivacyLedger:
    """The budget a site has spent, kept in a JSON file; open it with :meth:`open`."""

    def __init__(self, path: Path, site: str, target_epsilon: float, delta: float,
                 entries: list[LedgerEntry], digest: str) -> None:
        self.path = path
        self.site = site
        self.target_epsilon = target_epsilon
        self.delta = delta
        self._entries = entries
        self._digest = digest  # checksum of the file as last read or written

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, site: str, epsilon: float, delta: float) -> "PrivacyLedger":
        """Open the ledger at ``path``, creating it if there is none.

        Parameters
        ----------
        path
            The ledger file. Its folder must exist (a mistyped folder would
            otherwise silently start a fresh ledger).
        site
            The site's name; an existing ledger must belong to it.
        epsilon, delta
            The site's target budget; an existing ledger must have been created
            with the same values.

        Raises
        ------
        LedgerError
            If the file is unreadable, fails its checksum, or belongs to another
            site or budget.
        """
        path = Path(path)
        if not (math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
            raise LedgerError(f"invalid budget epsilon={epsilon}, delta={delta}: epsilon must be "
                              "a positive number and delta in (0, 1)")
        if not path.exists():
            return cls._create(path, site, float(epsilon), float(delta))
        ledger = cls._read(path)
        if ledger.site != site:
            raise LedgerError(f"the ledger at {path} belongs to site {ledger.site!r}, not {site!r}; "
                              "give each site its own ledger-path")
        if not (math.isclose(ledger.target_epsilon, epsilon, rel_tol=_REL_TOL)
                and math.isclose(ledger.delta, delta, rel_tol=_REL_TOL)):
            raise LedgerError(
                f"the ledger at {path} was created for epsilon={ledger.target_epsilon}, "
                f"delta={ledger.delta}, but this site now asks for epsilon={epsilon}, "
                f"delta={delta}; set the node config's epsilon and delta back to the ledger's "
                "values (the budget of a data set cannot be changed after it has been spent; "
                "it is never reset automatically)"
            )
        return ledger

    @classmethod
    def _create(cls, path: Path, site: str, epsilon: float, delta: float) -> "PrivacyLedger":
        if not path.parent.is_dir():
            raise LedgerError(f"cannot create the ledger at {path}: folder {path.parent} does not "
                              "exist; create it or fix the node config's ledger-path")
        ledger = cls(path, site, epsilon, delta, [], "")
        ledger._write(create=True)
        log.info("created privacy ledger %s for site %s (epsilon %g, delta %g)", path, site,
                 epsilon, delta)
        return ledger

    @classmethod
    def _read(cls, path: Path) -> "PrivacyLedger":
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger at {path}: {exc}") from None
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("checksum"), str):
            raise _corrupt(path, "no checksum")
        try:
            expected = checksum(body)
        except ValueError:  # NaN or infinity
            raise _corrupt(path, "non-finite number") from None
        if body["checksum"] != expected:
            raise _corrupt(path, "checksum mismatch")
        if body.get("version") != VERSION:
            raise LedgerError(f"the ledger at {path} has version {body.get('version')!r}; this "
                              f"fedseal reads version {VERSION}: upgrade fedseal")
        try:
            entries = [LedgerEntry(run=str(e["run"]), round=int(e["round"]),
                                   steps=int(e["steps"]), epsilon=float(e["epsilon"]),
                                   time=str(e["time"]),
                                   noise_multiplier=float(e.get("noise_multiplier", 0.0)),
                                   sample_rate=float(e.get("sample_rate", 0.0)))
                       for e in body["entries"]]
            return cls(path, str(body["site"]), float(body["target_epsilon"]),
                       float(body["delta"]), entries, body["checksum"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, "missing or malformed fields") from None

    # -- queries -----------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every recorded round, oldest first."""
        return tuple(self._entries)

    def _run_entries(self, run: str) -> list[LedgerEntry]:
        return [e for e in self._entries if e.run == str(run)]

    def steps_done(self, run: str) -> int:
        """DP-SGD steps this site has taken in ``run`` so far (0 for a new run)."""
        return max((e.steps for e in self._run_entries(run)), default=0)

    def epsilon_spent(self, run: str | None = None) -> float:
        """Epsilon spent: in ``run`` if given, else by the site in all runs.

        A run's spend is the latest (largest) cumulative epsilon recorded for it.
        The site's total is the sum over runs (sequential composition: an upper
        bound that holds whatever the runs' noise levels).
        """
        runs = [str(run)] if run is not None else sorted({e.run for e in self._entries})
        return sum(max(e.epsilon for e in self._run_entries(r)) for r in runs
                   if self._run_entries(r))

    def remaining(self) -> float:
        """Target epsilon minus everything spent (can be negative only if over-spent)."""
        return self.target_epsilon - self.epsilon_spent()

    def plan_of(self, run: str) -> tuple[float, float] | None:
        """``(noise_multiplier, sample_rate)`` the run started with, or None if unrecorded."""
        first = next(iter(self._run_entries(run)), None)
        if first is None or first.noise_multiplier <= 0:
            return None
        return first.noise_multiplier, first.sample_rate

    def has_round(self, run: str, round: int) -> bool:
        """Whether ``round`` of ``run`` is already recorded."""
        return any(e.round == round for e in self._run_entries(run))

    # -- recording ---------------------------------------------------------------------------

    def record(self, run: str, round: int, steps: int, epsilon: float, *,
               noise_multiplier: float = 0.0, sample_rate: float = 0.0) -> None:
        """Record that after ``round`` of ``run`` the site has taken ``steps`` steps, spending ``epsilon``.

        Both numbers are cumulative within the run. Call this *before* anything
        trained in the round leaves the site. Recording the same round twice
        with the same numbers is a no-op. A round trained again (the server
        lost its result and asked again) is recorded as a second entry with
        more steps: its spend is real and counts.

        Raises
        ------
        LedgerError
            On a conflicting duplicate, steps or epsilon smaller than already
            recorded for the run, invalid numbers, or a file changed by someone
            else since it was opened.
        """
        run = str(run)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise LedgerError(f"round must be a non-negative integer, got {round!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise LedgerError(f"steps must be a non-negative integer, got {steps!r}")
        epsilon = float(epsilon)
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise LedgerError(f"epsilon must be a finite number >= 0, got {epsilon}; a run "
                              "without DP has no finite epsilon and is not recorded")
        for e in self._run_entries(run):
            if e.round == round:
                if e.steps == steps and e.epsilon == epsilon:
                    return
                if steps <= e.steps:
                    raise LedgerError(
                        f"round {round} of run {run} is already in the ledger at {self.path} "
                        f"with steps={e.steps}, epsilon={e.epsilon}, not steps={steps}, "
                        f"epsilon={epsilon}; a retried round adds steps, it cannot rewrite them"
                    )
        if self.has_round(run, round):
            log.warning("round %d of run %s is trained again (the server lost its result); "
                        "the extra spend counts", round, run)
        if steps < self.steps_done(run) or epsilon < self.epsilon_spent(run) * (1 - 1e-9):
            raise LedgerError(
                f"run {run} already has steps={self.steps_done(run)}, "
                f"epsilon={self.epsilon_spent(run)} in {self.path}; round {round} reports "
                f"steps={steps}, epsilon={epsilon}, which are cumulative and cannot go down: "
                "start from ledger.steps_done(run)"
            )
        self._check_unchanged()
        time = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._entries.append(LedgerEntry(run, round, steps, epsilon, time,
                                         float(noise_multiplier), float(sample_rate)))
        try:
            self._write()
        except BaseException:
            self._entries.pop()
            raise

    def _check_unchanged(self) -> None:
        """Refuse to write over a file that changed since this object read or wrote it."""
        try:
            on_disk = json.loads(self.path.read_bytes().decode("utf-8")).get("checksum")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            on_disk = None
        if on_disk != self._digest:
            raise LedgerError(f"the ledger at {self.path} changed since it was opened (another "
                              "process, or an edit); reopen it with PrivacyLedger.open")

    def _body(self) -> dict[str, Any]:
        return {"version": VERSION, "site": self.site, "target_epsilon": self.target_epsilon,
                "delta": self.delta, "entries": [e.to_json() for e in self._entries]}

    def _write(self, create: bool = False) -> None:
        body = self._body()
        body["checksum"] = checksum(body)
        data = (json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        if create and self.path.exists():
            raise LedgerError(f"{self.path} appeared while the ledger was being created; reopen it")
        atomic_write(self.path, data)
        self._digest = body["checksum"]


__all__ = ["LedgerEntry", "LedgerError", "PrivacyLedger", "atomic_write", "checksum"]
