"""A site's persistent record of the privacy budget it has spent.

Flower keeps a ClientApp's ``Context.state`` in the SuperNode's memory: it
survives from one message to the next of a run, but not a restart of the
SuperNode. The budget a site has spent must not be forgotten that way, so each
site keeps this ledger, a small JSON file at its node config's
``ledger-path``::

    {"version": 2, "site": "hospital-a", "target_epsilon": 8.0, "delta": 1e-05, "seq": 7,
     "entries": [{"run": "123", "round": 1, "steps": 20, "epsilon": 0.91, "delta": 1e-05,
                  "noise_multiplier": 0.8, "sample_rate": 0.01,
                  "time": "2026-01-01T12:00:00+00:00"}, ...],
     "mac": "<HMAC-SHA256 under the site's ledger key>"}

An entry says: after ``round`` of ``run`` this site had taken ``steps`` DP-SGD
steps in that run, for a cumulative spend of ``(epsilon, delta)`` in that run.
Runs on the same data compose (basic sequential composition), so the site's
total is the sum over runs of each run's latest epsilon, and likewise of
deltas (:meth:`PrivacyLedger.epsilon_spent`, :meth:`PrivacyLedger.delta_spent`).

The MAC and the write counter ``seq`` are checked against the site's ledger
key and counter, kept apart from the ledger (:mod:`fedseal.client.ledger_seal`): an
edited entry, an older copy and a deleted ledger are each refused, never
reset; :func:`recover` is the deliberate way back. Every change is written
atomically (temporary file, fsync, ``os.replace``, fsync of the folder).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseal.client.ledger_seal import (LEDGER_CONTEXT, Counter, SealError, counter_path, create_key,
                                mac, read_counter, read_key, write_counter)
from fedseal.common.durable import atomic_write

log = logging.getLogger(__name__)

VERSION = 2
CARRIED_FORWARD = "carried-forward"  # run name prefix of the entries `recover` adds
_REL_TOL = 1e-12  # budgets are compared after a JSON round trip, which is exact; be lenient anyway


class LedgerError(RuntimeError):
    """The privacy ledger is unreadable, modified, rolled back, deleted, or refuses an entry."""


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded round: cumulative ``steps``, ``epsilon`` and ``delta`` of ``run`` after ``round``."""

    run: str
    round: int
    steps: int
    epsilon: float
    time: str
    noise_multiplier: float = 0.0  # the run's DP plan (0.0: not recorded)
    sample_rate: float = 0.0
    delta: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in the file."""
        return {"run": self.run, "round": self.round, "steps": self.steps,
                "epsilon": self.epsilon, "delta": self.delta, "time": self.time,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}


def _recover_hint(path: Path, key_path: Path) -> str:
    return (f"If this was deliberate (a backup restored, or the ledger lost for good), run "
            f"`fedseal ledger recover --ledger {path} --ledger-key {key_path}`: it keeps the "
            "latest totals the counter remembers, so no recorded spend is forgotten")


class PrivacyLedger:
    """The budget a site has spent, kept in a MACed JSON file; open it with :meth:`open`."""

    def __init__(self, path: Path, key_path: Path, key: bytes, site: str, target_epsilon: float,
                 delta: float, entries: list[LedgerEntry], seq: int, file_mac: str) -> None:
        self.path = path
        self.key_path = key_path
        self._key = key
        self.site = site
        self.target_epsilon = target_epsilon
        self.delta = delta
        self._entries = entries
        self.seq = seq  # number of this ledger's latest write
        self._mac = file_mac  # MAC of the file as last read or written

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, site: str, epsilon: float, delta: float, *,
             key_path: str | Path) -> "PrivacyLedger":
        """Open the ledger at ``path``, creating it (and its key) if this site has none yet.

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
        key_path
            The site's ledger key, kept apart from the ledger; its counter
            lives beside it (``<key_path>.counter``).

        Raises
        ------
        LedgerError
            If the ledger or its key is unreadable, the ledger fails its MAC, is
            older than the counter or was deleted, or belongs to another site or
            budget. The message says what to do.
        """
        path, key_path = Path(path), Path(key_path)
        if not (math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
            raise LedgerError(f"invalid budget epsilon={epsilon}, delta={delta}: epsilon must be "
                              "a positive number and delta in (0, 1)")
        key, counter = cls._seal(path, key_path)
        if not path.exists():
            if counter is not None and counter.seq > 0:
                raise LedgerError(
                    f"the ledger at {path} is gone, but its counter ({counter_path(key_path)}) "
                    f"remembers {counter.seq} writes and a spend of epsilon {counter.epsilon:.4g}, "
                    f"delta {counter.delta:.3g}: it was deleted or moved. Put it back, or: "
                    + _recover_hint(path, key_path))
            return cls._create(path, key_path, key, site, float(epsilon), float(delta))
        ledger = cls._read(path, key_path, key)
        ledger._check_counter(counter)
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

    @staticmethod
    def _seal(path: Path, key_path: Path) -> tuple[bytes, Counter | None]:
        """The ledger key (made on a site's first use) and the counter, if any."""
        if key_path.resolve().parent == path.resolve().parent:
            log.warning("the ledger key %s is in the same folder as the ledger %s: a backup "
                        "restored over both cannot be detected; keep the key elsewhere",
                        key_path, path)
        try:
            if key_path.exists():
                key = read_key(key_path)
            elif path.exists():
                raise LedgerError(
                    f"the ledger at {path} exists but its key {key_path} does not, so the ledger "
                    "cannot be verified; restore the key (or point --ledger-key at it). Without "
                    "it the recorded spend cannot be trusted and is never reset automatically")
            else:
                key = create_key(key_path)
                log.info("created the ledger key %s (keep it apart from the ledger and its "
                         "backups; the ledger cannot be verified without it)", key_path)
            return key, read_counter(counter_path(key_path), key)
        except SealError as exc:
            raise LedgerError(str(exc)) from None

    @classmethod
    def _create(cls, path: Path, key_path: Path, key: bytes, site: str, epsilon: float,
                delta: float) -> "PrivacyLedger":
        if not path.parent.is_dir():
            raise LedgerError(f"cannot create the ledger at {path}: folder {path.parent} does not "
                              "exist; create it or fix the node config's ledger-path")
        ledger = cls(path, key_path, key, site, epsilon, delta, [], -1, "")
        ledger._write(create=True)
        log.info("created privacy ledger %s for site %s (epsilon %g, delta %g)", path, site,
                 epsilon, delta)
        return ledger

    @classmethod
    def _read(cls, path: Path, key_path: Path, key: bytes) -> "PrivacyLedger":
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger at {path}: {exc}") from None
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("mac"), str):
            raise _corrupt(path, "no MAC" + (" (a version-1 ledger: see the README on upgrading)"
                                             if "checksum" in body else ""))
        try:
            expected = mac(key, LEDGER_CONTEXT, {k: v for k, v in body.items() if k != "mac"})
        except ValueError:  # NaN or infinity
            raise _corrupt(path, "non-finite number") from None
        if not hmac.compare_digest(body["mac"], expected):
            raise _corrupt(path, "MAC mismatch: edited, or made under another ledger key")
        if body.get("version") != VERSION:
            raise LedgerError(f"the ledger at {path} has version {body.get('version')!r}; this "
                              f"fedseal reads version {VERSION}: upgrade fedseal")
        try:
            entries = [LedgerEntry(run=str(e["run"]), round=int(e["round"]),
                                   steps=int(e["steps"]), epsilon=float(e["epsilon"]),
                                   time=str(e["time"]),
                                   noise_multiplier=float(e["noise_multiplier"]),
                                   sample_rate=float(e["sample_rate"]), delta=float(e["delta"]))
                       for e in body["entries"]]
            return cls(path, key_path, key, str(body["site"]), float(body["target_epsilon"]),
                       float(body["delta"]), entries, int(body["seq"]), body["mac"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, "missing or malformed fields") from None

    def _check_counter(self, counter: Counter | None) -> None:
        """The ledger must be the latest write the counter knows of (or one ahead: a crash)."""
        hint = _recover_hint(self.path, self.key_path)
        if counter is None:
            raise LedgerError(f"the ledger at {self.path} has no counter "
                              f"({counter_path(self.key_path)} is missing), so an older copy "
                              "could not be told from the latest; restore the counter. " + hint)
        if counter.site != self.site:
            raise LedgerError(f"the counter {counter_path(self.key_path)} belongs to site "
                              f"{counter.site!r}, not {self.site!r}; give each site its own key")
        if self.seq == counter.seq and hmac.compare_digest(self._mac, counter.ledger_mac):
            return
        if self.seq == counter.seq + 1:  # the last write crashed before the counter caught up
            self._advance_counter(self.seq, self._mac)
            return
        if self.seq < counter.seq:
            raise LedgerError(
                f"the ledger at {self.path} is an older copy: it is write {self.seq} (epsilon "
                f"{self.epsilon_spent():.4g}), but the counter remembers write {counter.seq} "
                f"(epsilon {counter.epsilon:.4g}, delta {counter.delta:.3g}). Using it would "
                "forget spend. Put the latest ledger back, or: " + hint)
        raise LedgerError(f"the ledger at {self.path} (write {self.seq}) does not match its "
                          f"counter (write {counter.seq}): the counter was restored from an "
                          "older copy, or the ledger comes from elsewhere. " + hint)

    # -- queries -----------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every recorded round, oldest first."""
        return tuple(self._entries)

    def _run_entries(self, run: str) -> list[LedgerEntry]:
        return [e for e in self._entries if e.run == str(run)]

    def _runs(self, run: str | None) -> list[str]:
        return [str(run)] if run is not None else sorted({e.run for e in self._entries})

    def steps_done(self, run: str) -> int:
        """DP-SGD steps this site has taken in ``run`` so far (0 for a new run)."""
        return max((e.steps for e in self._run_entries(run)), default=0)

    def epsilon_spent(self, run: str | None = None) -> float:
        """Epsilon spent: in ``run`` if given, else by the site in all runs.

        A run's spend is the latest (largest) cumulative epsilon recorded for it.
        The site's total is the sum over runs (sequential composition: an upper
        bound that holds whatever the runs' noise levels).
        """
        return float(sum(max(e.epsilon for e in self._run_entries(r)) for r in self._runs(run)
                         if self._run_entries(r)))

    def delta_spent(self, run: str | None = None) -> float:
        """Delta spent: in ``run`` if given, else summed over all runs (as epsilon is)."""
        return float(sum(max(e.delta for e in self._run_entries(r)) for r in self._runs(run)
                         if self._run_entries(r)))

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
               noise_multiplier: float = 0.0, sample_rate: float = 0.0,
               delta: float | None = None) -> LedgerEntry:
        """Record that after ``round`` of ``run`` the site has taken ``steps`` steps, spending ``epsilon``.

        Both numbers are cumulative within the run; ``delta`` is the run's
        delta (default: the ledger's). Call this *before* anything trained in
        the round leaves the site. Recording the same round twice with the
        same numbers is a no-op. A round trained again (the server lost its
        result and asked again) is recorded as a second entry with more
        steps: its spend is real and counts.

        Returns
        -------
        LedgerEntry
            The entry as committed to disk (also for a no-op repeat).

        Raises
        ------
        LedgerError
            On a conflicting duplicate, steps or epsilon smaller than already
            recorded for the run, invalid numbers, or a file changed by someone
            else since it was opened.
        """
        run = str(run)
        delta = self.delta if delta is None else float(delta)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise LedgerError(f"round must be a non-negative integer, got {round!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise LedgerError(f"steps must be a non-negative integer, got {steps!r}")
        epsilon = float(epsilon)
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise LedgerError(f"epsilon must be a finite number >= 0, got {epsilon}; a run "
                              "without DP has no finite epsilon and is not recorded")
        if not 0 <= delta < 1:
            raise LedgerError(f"delta must be in [0, 1), got {delta}")
        for e in self._run_entries(run):
            if e.round == round:
                if e.steps == steps and e.epsilon == epsilon:
                    return e
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
        entry = LedgerEntry(run, round, steps, epsilon, time, float(noise_multiplier),
                            float(sample_rate), delta)
        self._entries.append(entry)
        try:
            self._write()
        except BaseException:
            self._entries.pop()
            raise
        return entry

    def _check_unchanged(self) -> None:
        """Refuse to write over a file that changed since this object read or wrote it."""
        try:
            on_disk = json.loads(self.path.read_bytes().decode("utf-8")).get("mac")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            on_disk = None
        if on_disk != self._mac:
            raise LedgerError(f"the ledger at {self.path} changed since it was opened (another "
                              "process, or an edit); reopen it with PrivacyLedger.open")

    def _body(self, seq: int) -> dict[str, Any]:
        return {"version": VERSION, "site": self.site, "target_epsilon": self.target_epsilon,
                "delta": self.delta, "seq": seq, "entries": [e.to_json() for e in self._entries]}

    def _write(self, create: bool = False) -> None:
        """Ledger first (one write ahead), then the counter: see :mod:`fedseal.client.ledger_seal`."""
        seq = self.seq + 1
        body = self._body(seq)
        body["mac"] = mac(self._key, LEDGER_CONTEXT, self._body(seq))
        data = (json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        if create and self.path.exists():
            raise LedgerError(f"{self.path} appeared while the ledger was being created; reopen it")
        try:
            atomic_write(self.path, data)
            self._advance_counter(seq, body["mac"])
        except OSError as exc:
            # seq and mac stay as they were: if only the counter failed, the file is one
            # write ahead (which a reopen accepts) and this object refuses to write over it.
            raise LedgerError(f"cannot write the privacy ledger {self.path} or its counter "
                              f"({exc}): free disk space or fix the permissions of the ledger's "
                              "and the key's folders") from None
        self.seq, self._mac = seq, body["mac"]

    def _advance_counter(self, seq: int, ledger_mac: str) -> None:
        write_counter(counter_path(self.key_path), self._key,
                      Counter(self.site, seq, ledger_mac, float(self.epsilon_spent()),
                              float(self.delta_spent())))


def _corrupt(path: Path, why: str) -> LedgerError:
    return LedgerError(f"the ledger at {path} was modified or corrupted ({why}); restore it from "
                       "backup; it is never reset automatically")


def recover(path: str | Path, key_path: str | Path, site: str | None = None,
            epsilon: float | None = None, delta: float | None = None) -> PrivacyLedger:
    """Deliberately accept an older copy of the ledger, or a lost one, without forgetting spend.

    The ledger at ``path`` (an older genuine copy, MAC verified) or, when it is
    gone, a new empty one for ``site`` with budget ``(epsilon, delta)``, gets
    one entry (run ``carried-forward-<time>``) holding the difference between
    the totals the counter remembers and the totals the ledger holds, so the
    site's recorded spend never goes down. Its steps and plan are unknown, so
    a job that was running goes on as a new one.

    Raises
    ------
    LedgerError
        If the key or counter is missing, the ledger fails its MAC (restore a
        genuine copy first), or a lost ledger's site and budget are not given.
    """
    path, key_path = Path(path), Path(key_path)
    try:
        key = read_key(key_path)
        counter = read_counter(counter_path(key_path), key)
    except SealError as exc:
        raise LedgerError(str(exc)) from None
    if counter is None:
        raise LedgerError(f"{counter_path(key_path)} is missing: there is nothing to recover "
                          "against; restore the counter beside the key")
    if path.exists():
        ledger = PrivacyLedger._read(path, key_path, key)
    else:
        if site is None or epsilon is None or delta is None:
            raise LedgerError(f"the ledger at {path} is gone: give the site's name, epsilon and "
                              "delta to start a new one that carries the counter's totals")
        ledger = PrivacyLedger(path, key_path, key, site, float(epsilon), float(delta), [],
                               counter.seq, "")
    if ledger.site != counter.site:
        raise LedgerError(f"the counter belongs to site {counter.site!r}, the ledger to "
                          f"{ledger.site!r}")
    missing_eps = max(0.0, counter.epsilon - ledger.epsilon_spent())
    missing_delta = max(0.0, counter.delta - ledger.delta_spent())
    ledger.seq = max(ledger.seq, counter.seq)
    if missing_eps > 0 or missing_delta > 0:
        time = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        ledger._entries.append(LedgerEntry(f"{CARRIED_FORWARD}-{time}", 0, 0, missing_eps, time,
                                           delta=missing_delta))
    ledger._write()
    log.warning("ledger %s recovered: epsilon %.4g and delta %.3g the counter remembered beyond "
                "this copy are carried forward; total now epsilon %.4g, delta %.3g", path,
                missing_eps, missing_delta, ledger.epsilon_spent(), ledger.delta_spent())
    return ledger


__all__ = ["LedgerEntry", "LedgerError", "PrivacyLedger", "recover"]
