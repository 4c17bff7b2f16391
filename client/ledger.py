"""A site's persistent record of its privacy budget: the total, each job's grant, the spend.

Flower keeps a ClientApp's ``Context.state`` in the SuperNode's memory: it
survives from one message to the next of a run, but not a restart of the
SuperNode. The budget a site has spent must not be forgotten that way, so each
site keeps this ledger, a small JSON file at its node config's
``ledger-path`` (format version 3)::

    {"version": 3, "site": "hospital-a", "seq": 9,
     "total": {"epsilon": 16.0, "delta": 1e-05},
     "raises": [{"time": "...", "by": "dana", "reason": "second study approved",
                 "old": {"epsilon": 8.0, "delta": 1e-05},
                 "new": {"epsilon": 16.0, "delta": 1e-05}}],
     "grants": [{"job": "9f3c...", "epsilon": 4.0, "delta": 2.5e-06, "asked_delta": 1e-05,
                 "time": "..."}, ...],
     "entries": [{"run": "9f3c...", "round": 1, "steps": 20, "epsilon": 0.91,
                  "delta": 2.5e-06, "noise_multiplier": 0.8, "sample_rate": 0.01,
                  "time": "..."}, ...],
     "mac": "<HMAC-SHA256 under the site's ledger key>"}

``total`` is the site's budget over all jobs (``fedseal client --epsilon
--delta``); only ``fedseal ledger raise`` changes it, and each change is a
``raises`` record (who, when, why, old and new). A ``grant`` is what a job may
spend, recorded at its first round before any of its spend
(:mod:`fedseal.client.budget` decides it) and never recomputed. An entry says:
after ``round`` of job ``run`` this site had taken ``steps`` DP-SGD steps in
that job, for a cumulative spend of ``(epsilon, delta)`` in that job, where
``delta`` is the job's granted delta. Jobs on the same data compose (basic
sequential composition): the site's spend is the sum over jobs of each job's
latest epsilon, and likewise of deltas (:meth:`PrivacyLedger.epsilon_spent`,
:meth:`PrivacyLedger.delta_spent`). A job holds its whole grant, spent or
not (the site cannot tell a job that ended from one the server will resume),
so what is left for new jobs is the total less every grant
(:meth:`PrivacyLedger.remaining`). The ledger refuses a grant, and a record,
that would take epsilon or delta over the total, and a record over its job's
grant. A version-2 ledger (no grants, no raises; each job added a whole
delta) is read as version 3 with its jobs' spend as what they hold, and written
as version 3 at its next change; a job started under version 2 cannot go on.

The MAC and the write counter ``seq`` are checked against the site's ledger
key and counter, kept apart from the ledger (:mod:`fedseal.client.ledger_seal`):
an edited entry, an older copy, a deleted ledger and a ledger deleted together
with its counter while the key stays are each refused, never reset;
:func:`recover` is the deliberate way back. Every change is written atomically
(temporary file, fsync, ``os.replace``, fsync of the folder).

What no file at the site can prevent: the site operator deleting the key, its
counter and the ledger together. That is the operator resetting the site's own
records, and the next start begins a new ledger with nothing spent.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedseal.client.ledger_seal import (
    LEDGER_CONTEXT,
    LEDGER_CONTEXTS,
    Counter,
    SealError,
    counter_path,
    create_seal,
    mac,
    read_counter,
    read_key,
    write_counter,
)
from fedseal.common.durable import atomic_write
from fedseal.common.errors import FedsealError

log = logging.getLogger(__name__)

VERSION = 3
CARRIED_FORWARD = "carried-forward"  # run name prefix of the entries `recover` adds
_REL_TOL = 1e-12  # budgets are compared after a JSON round trip, which is exact; be lenient anyway
_JOB_ID = re.compile(r"[\x21-\x7e]{1,64}")  # what the server may name a job: printable, no spaces


class LedgerError(FedsealError, RuntimeError):
    """The privacy ledger is unreadable, modified, rolled back, deleted, or refuses an entry."""

    code = "ledger.error"


def _num(value: float) -> str:
    """A budget number as a site operator types it (8, 1e-05, 0.3333333333)."""
    return f"{value:.10g}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Budget:
    """An ``(epsilon, delta)`` pair: a site's total, a job's grant, a spend or what is left."""

    epsilon: float
    delta: float

    @classmethod
    def checked(cls, epsilon: float, delta: float) -> Budget:
        """A total budget: epsilon a positive finite number, delta in (0, 1).

        Raises
        ------
        LedgerError
            If either is out of range.
        """
        epsilon, delta = float(epsilon), float(delta)
        if not (math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
            raise LedgerError(
                f"invalid budget epsilon={epsilon}, delta={delta}: epsilon must be "
                "a positive number and delta in (0, 1)"
            )
        return cls(epsilon, delta)

    def isclose(self, other: Budget) -> bool:
        """Whether both numbers match (after a JSON round trip they are exact)."""
        return math.isclose(self.epsilon, other.epsilon, rel_tol=_REL_TOL) and math.isclose(
            self.delta, other.delta, rel_tol=_REL_TOL
        )


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
    mechanism: dict[str, float] | None = None  # under distributed noise: the round's DdgMechanism


@dataclass(frozen=True)
class Grant:
    """What ``job`` may spend at this site: ``(epsilon, delta)``, fixed at its first round.

    ``asked_delta`` is the delta the run asked for (the grant's may be lower);
    ``time`` is empty for a grant that is not recorded (a site without a ledger).
    """

    job: str
    epsilon: float
    delta: float
    asked_delta: float
    time: str


@dataclass(frozen=True)
class Raise:
    """The site operator raised the total from ``old`` to ``new``: ``by`` whom, when, why."""

    time: str
    by: str
    reason: str
    old: Budget
    new: Budget


def _recover_hint(path: Path, key_path: Path) -> str:
    return (
        f"If this was deliberate (a backup restored, or the ledger lost for good), run "
        f"`fedseal ledger recover --ledger {path} --ledger-key {key_path}`: it keeps the "
        "latest totals the counter remembers, so no recorded spend is forgotten"
    )


class PrivacyLedger:
    """A site's budget and spend, kept in a MACed JSON file; open it with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        key_path: Path,
        key: bytes,
        site: str,
        total: Budget,
        entries: list[LedgerEntry],
        seq: int,
        file_mac: str,
        grants: list[Grant] | None = None,
        raises: list[Raise] | None = None,
    ) -> None:
        self.path = path
        self.key_path = key_path
        self._key = key
        self.site = site
        self.total = total  # the site's budget over all jobs
        self._entries = entries
        self._grants = grants if grants is not None else []
        self._raises = raises if raises is not None else []
        self.seq = seq  # number of this ledger's latest write
        self._mac = file_mac  # MAC of the file as last read or written

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | Path, site: str, epsilon: float, delta: float, *, key_path: str | Path
    ) -> PrivacyLedger:
        """Open the ledger at ``path``, creating it (and its key and counter) on a site's first use.

        Parameters
        ----------
        path
            The ledger file. Its folder must exist (a mistyped folder would
            otherwise silently start a fresh ledger).
        site
            The site's name; an existing ledger must belong to it.
        epsilon, delta
            The site's total budget over all jobs; an existing ledger must hold
            the same total (``fedseal ledger raise`` changes it, on purpose).
        key_path
            The site's ledger key, kept apart from the ledger; its counter
            lives beside it (``<key_path>.counter``).

        Raises
        ------
        LedgerError
            If the ledger, its key or its counter is unreadable or missing, the
            ledger fails its MAC, is older than the counter or was deleted, or
            belongs to another site or total. The message says what to do.
        """
        path, key_path = Path(path), Path(key_path)
        total = Budget.checked(epsilon, delta)
        key, counter = cls._seal(path, key_path, site)
        if not path.exists():
            _refuse_gone(path, key_path, counter)
            if counter.site != site:
                raise LedgerError(
                    f"the ledger key {key_path} was made for site {counter.site!r}, "
                    f"not {site!r}; give each site its own key"
                )
            return cls._create(path, key_path, key, site, total, counter.seq)
        ledger = cls._read(path, key_path, key)
        ledger._check_counter(counter)
        if ledger.site != site:
            raise LedgerError(
                f"the ledger at {path} belongs to site {ledger.site!r}, not {site!r}; "
                "give each site its own ledger-path"
            )
        if not ledger.total.isclose(total):
            raise LedgerError(ledger._total_mismatch(total))
        return ledger

    @classmethod
    def load(cls, path: str | Path, key_path: str | Path) -> PrivacyLedger:
        """The existing ledger at ``path``, verified (MAC, counter), whatever its site and total.

        Raises
        ------
        LedgerError
            If there is no ledger, or :meth:`open` would refuse it for any
            reason but its site or total.
        """
        path, key_path = Path(path), Path(key_path)
        key, counter = _read_seal(key_path)
        counter = _require_counter(path, key_path, counter)
        if not path.exists():
            _refuse_gone(path, key_path, counter)
            raise LedgerError(
                f"there is no ledger at {path} yet: fedseal client creates it on the site's first start"
            )
        ledger = cls._read(path, key_path, key)
        ledger._check_counter(counter)
        return ledger

    def _total_mismatch(self, asked: Budget) -> str:
        """Why a site started with total ``asked`` cannot use this ledger, and what to do."""
        since = f" (raised on {self._raises[-1].time} by {self._raises[-1].by})" if self._raises else ""
        said = (
            f"the ledger at {self.path} holds the site's total budget epsilon "
            f"{_num(self.total.epsilon)}, delta {_num(self.total.delta)}{since}, but this site "
            f"was started with epsilon {_num(asked.epsilon)}, delta {_num(asked.delta)} "
            f"(fedseal client --epsilon, --delta). Start it with --epsilon "
            f"{_num(self.total.epsilon)} --delta {_num(self.total.delta)}"
        )
        if asked.epsilon >= self.total.epsilon and asked.delta >= self.total.delta:
            return (
                said + ", or raise the total on purpose (the ledger records who, when and "
                f"why): `fedseal ledger raise --ledger {self.path} --ledger-key "
                f"{self.key_path} --epsilon {_num(asked.epsilon)} --delta "
                f"{_num(asked.delta)} --by NAME --reason TEXT`"
            )
        return said + "; a total is never lowered (to give each run less, use --max-run-epsilon)"

    @staticmethod
    def _seal(path: Path, key_path: Path, site: str) -> tuple[bytes, Counter]:
        """The ledger key and counter (both made on a site's first use)."""
        if key_path.resolve().parent == path.resolve().parent:
            log.warning(
                "the ledger key %s is in the same folder as the ledger %s: a backup "
                "restored over both cannot be detected; keep the key elsewhere",
                key_path,
                path,
            )
        try:
            if key_path.exists():
                key = read_key(key_path)
            elif path.exists():
                raise LedgerError(
                    f"the ledger at {path} exists but its key {key_path} does not, so the ledger "
                    "cannot be verified; restore the key (or point --ledger-key at it). Without "
                    "it the recorded spend cannot be trusted and is never reset automatically"
                )
            else:
                key = create_seal(key_path, site)
                log.info(
                    "created the ledger key %s and its counter (keep them apart from the "
                    "ledger and its backups; the ledger cannot be verified without them)",
                    key_path,
                )
            counter = read_counter(counter_path(key_path), key)
        except SealError as exc:
            raise LedgerError(str(exc)) from None
        return key, _require_counter(path, key_path, counter)

    @classmethod
    def _create(
        cls, path: Path, key_path: Path, key: bytes, site: str, total: Budget, seq: int
    ) -> PrivacyLedger:
        if not path.parent.is_dir():
            raise LedgerError(
                f"cannot create the ledger at {path}: folder {path.parent} does not "
                "exist; create it or fix the node config's ledger-path"
            )
        ledger = cls(path, key_path, key, site, total, [], seq, "")
        ledger._write(create=True)
        log.info(
            "created privacy ledger %s for site %s (total epsilon %s, delta %s)",
            path,
            site,
            _num(total.epsilon),
            _num(total.delta),
        )
        return ledger

    @classmethod
    def _read(cls, path: Path, key_path: Path, key: bytes) -> PrivacyLedger:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger at {path}: {exc}") from None
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("mac"), str):
            raise _corrupt(
                path,
                "no MAC"
                + (
                    " (a version-1 ledger, from before ledgers were sealed: recover it with fedseal ledger recover)"
                    if isinstance(body, dict) and "checksum" in body
                    else ""
                ),
            )
        version = body.get("version")
        if version not in LEDGER_CONTEXTS:
            raise LedgerError(
                f"the ledger at {path} has version {version!r}; this fedseal reads "
                f"versions {', '.join(map(str, LEDGER_CONTEXTS))}: upgrade fedseal"
            )
        try:
            expected = mac(key, LEDGER_CONTEXTS[version], {k: v for k, v in body.items() if k != "mac"})
        except ValueError:  # NaN or infinity
            raise _corrupt(path, "non-finite number") from None
        if not hmac.compare_digest(body["mac"], expected):
            raise _corrupt(path, "MAC mismatch: edited, or made under another ledger key")
        try:
            entries = [
                LedgerEntry(
                    run=str(e["run"]),
                    round=int(e["round"]),
                    steps=int(e["steps"]),
                    epsilon=float(e["epsilon"]),
                    time=str(e["time"]),
                    noise_multiplier=float(e["noise_multiplier"]),
                    sample_rate=float(e["sample_rate"]),
                    delta=float(e["delta"]),
                    mechanism=_mechanism(e.get("mechanism")),
                )
                for e in body["entries"]
            ]
            if version == 2:
                log.info(
                    "the ledger at %s is version 2: read as version %d (each of its jobs "
                    "holds what it spent) and written as version %d at its next change",
                    path,
                    VERSION,
                    VERSION,
                )
                return cls(
                    path,
                    key_path,
                    key,
                    str(body["site"]),
                    Budget(float(body["target_epsilon"]), float(body["delta"])),
                    entries,
                    int(body["seq"]),
                    body["mac"],
                )
            grants = [
                Grant(
                    str(g["job"]),
                    float(g["epsilon"]),
                    float(g["delta"]),
                    float(g["asked_delta"]),
                    str(g["time"]),
                )
                for g in body["grants"]
            ]
            raises = [
                Raise(
                    str(r["time"]),
                    str(r["by"]),
                    str(r["reason"]),
                    Budget(float(r["old"]["epsilon"]), float(r["old"]["delta"])),
                    Budget(float(r["new"]["epsilon"]), float(r["new"]["delta"])),
                )
                for r in body["raises"]
            ]
            total = Budget(float(body["total"]["epsilon"]), float(body["total"]["delta"]))
            return cls(
                path,
                key_path,
                key,
                str(body["site"]),
                total,
                entries,
                int(body["seq"]),
                body["mac"],
                grants,
                raises,
            )
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, "missing or malformed fields") from None

    def _check_counter(self, counter: Counter) -> None:
        """The ledger must be the latest write the counter knows of (or one ahead: a crash)."""
        hint = _recover_hint(self.path, self.key_path)
        if counter.site != self.site:
            raise LedgerError(
                f"the counter {counter_path(self.key_path)} belongs to site "
                f"{counter.site!r}, not {self.site!r}; give each site its own key"
            )
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
                "forget spend. Put the latest ledger back, or: " + hint
            )
        raise LedgerError(
            f"the ledger at {self.path} (write {self.seq}) does not match its "
            f"counter (write {counter.seq}): the counter was restored from an "
            "older copy, or the ledger comes from elsewhere. " + hint
        )

    # -- queries -----------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every recorded round, oldest first."""
        return tuple(self._entries)

    @property
    def grants(self) -> tuple[Grant, ...]:
        """Every job's grant, oldest first."""
        return tuple(self._grants)

    @property
    def raises(self) -> tuple[Raise, ...]:
        """Every raise of the total, oldest first."""
        return tuple(self._raises)

    def jobs(self) -> list[str]:
        """Every job with a grant or a recorded round, in the order they first appear."""
        seen = dict.fromkeys([g.job for g in self._grants] + [e.run for e in self._entries])
        return list(seen)

    def grant_of(self, job: str) -> Grant | None:
        """The grant recorded for ``job``, if any."""
        return next((g for g in self._grants if g.job == str(job)), None)

    def _run_entries(self, run: str) -> list[LedgerEntry]:
        return [e for e in self._entries if e.run == str(run)]

    def steps_done(self, run: str) -> int:
        """DP-SGD steps this site has taken in ``run`` so far (0 for a new run)."""
        return max((e.steps for e in self._run_entries(run)), default=0)

    def _spends(self) -> dict[str, Budget]:
        """Each job's spend: its latest (largest) cumulative epsilon, at its delta."""
        spends: dict[str, Budget] = {}
        for e in self._entries:
            before = spends.get(e.run, Budget(0.0, 0.0))
            spends[e.run] = Budget(max(before.epsilon, e.epsilon), max(before.delta, e.delta))
        return spends

    def spent(self, run: str | None = None) -> Budget:
        """Epsilon and delta spent: in ``run`` if given, else by the site in all jobs.

        A job's spend is the latest (largest) cumulative epsilon recorded for
        it, at its delta. The site's is the sum over jobs (sequential
        composition: an upper bound whatever the jobs' noise levels).
        """
        spends = self._spends()
        if run is not None:
            return spends.get(str(run), Budget(0.0, 0.0))
        return Budget(
            float(sum(b.epsilon for b in spends.values())), float(sum(b.delta for b in spends.values()))
        )

    def epsilon_spent(self, run: str | None = None) -> float:
        """Epsilon spent: in ``run`` if given, else by the site in all jobs (:meth:`spent`)."""
        return self.spent(run).epsilon

    def delta_spent(self, run: str | None = None) -> float:
        """Delta spent: in ``run`` if given, else summed over all jobs (:meth:`spent`)."""
        return self.spent(run).delta

    def held(self, run: str | None = None) -> Budget:
        """What ``run`` holds of the total (every job's, if None): its grant, or a larger spend.

        A granted job holds its grant whether or not it spent it; a job without
        a grant (from a version-2 ledger, or carried forward by :func:`recover`)
        holds its spend.
        """
        spends, grants = self._spends(), {g.job: g for g in self._grants}
        epsilon = delta = 0.0
        for job in [str(run)] if run is not None else self.jobs():
            spent, grant = spends.get(job, Budget(0.0, 0.0)), grants.get(job)
            epsilon += max(spent.epsilon, grant.epsilon if grant else 0.0)
            delta += max(spent.delta, grant.delta if grant else 0.0)
        return Budget(epsilon, delta)

    def remaining(self) -> Budget:
        """The total less what every job holds: what new jobs may be granted.

        Negative only where jobs hold more than the total (a version-2 ledger,
        whose jobs each added a whole delta, or a recovery that carried spend
        forward).
        """
        held = self.held()
        return Budget(self.total.epsilon - held.epsilon, self.total.delta - held.delta)

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

    def record_grant(self, job: str, epsilon: float, delta: float, asked_delta: float) -> Grant:
        """Record that ``job`` may spend ``(epsilon, delta)``; call it before any of its spend.

        :func:`fedseal.client.budget.grant` decides the numbers; this checks
        them once more against the total and commits them to disk.

        Raises
        ------
        LedgerError
            If ``job`` is not a printable id of at most 64 characters, already
            has a grant or recorded rounds, the numbers are invalid, the grant
            would take what jobs hold over the total (epsilon or delta), or the
            file changed since it was opened.
        """
        job = str(job)
        if not _JOB_ID.fullmatch(job):
            raise LedgerError(
                f"job id {job[:80]!r} is not 1 to 64 printable characters without "
                "spaces; the server's job id is not recorded"
            )
        if self.grant_of(job) is not None:
            raise LedgerError(f"job {job} already has a grant in {self.path}; a grant is never recomputed")
        if self._run_entries(job):
            raise LedgerError(
                f"job {job} has rounds in {self.path} but no grant (it started "
                "under an older fedseal, or was carried forward); it cannot go "
                "on: start a new run"
            )
        epsilon, delta, asked_delta = float(epsilon), float(delta), float(asked_delta)
        if not (math.isfinite(epsilon) and epsilon > 0 and 0 < delta <= asked_delta < 1):
            raise LedgerError(
                f"invalid grant epsilon={epsilon}, delta={delta} (asked "
                f"{asked_delta}): epsilon must be positive, 0 < delta <= asked < 1"
            )
        held = self.held()
        self._check_total(
            held.epsilon + epsilon,
            held.delta + delta,
            f"granting job {job} epsilon {_num(epsilon)}, delta {_num(delta)}",
        )
        self._check_unchanged()
        grant = Grant(job, epsilon, delta, asked_delta, _now())
        self._grants.append(grant)
        self._commit(self._grants.pop)
        log.info(
            "site %s grants job %s epsilon %s, delta %s (left for new jobs: epsilon %s, delta %s)",
            self.site,
            job,
            _num(epsilon),
            _num(delta),
            _num(self.remaining().epsilon),
            _num(self.remaining().delta),
        )
        return grant

    def record(
        self,
        run: str,
        round: int,
        steps: int,
        epsilon: float,
        *,
        noise_multiplier: float = 0.0,
        sample_rate: float = 0.0,
        evaluation: bool = False,
        mechanism: dict[str, float] | None = None,
    ) -> LedgerEntry:
        """Record that after ``round`` of ``run`` the site has taken ``steps`` steps, spending ``epsilon``.

        Both numbers are cumulative within the job, whose grant
        (:meth:`record_grant`) must be recorded; the entry's delta is the
        grant's. Call this *before* anything trained in the round leaves the
        site. Recording the same round twice with the same numbers is a no-op.
        A round trained again (the server lost its result and asked again) is
        recorded as a second entry with more steps: its spend is real and
        counts. So is an evaluation step after a round (``evaluation``: the
        same kind of entry, one step more, without the warning a retrain gets).
        Under distributed noise ``mechanism`` holds the round's mechanism
        (:class:`fedseal.common.ddp.DdgMechanism`'s fields), from which the
        job's spend is recomputed (:mod:`fedseal.client.ddp_round`).

        Returns
        -------
        LedgerEntry
            The entry as committed to disk (also for a no-op repeat).

        Raises
        ------
        LedgerError
            On a job without a grant, a conflicting duplicate, steps or epsilon
            smaller than already recorded for the job, invalid numbers, a spend
            over the job's grant or the site's total, or a file changed by
            someone else since it was opened.
        """
        run = str(run)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise LedgerError(f"round must be a non-negative integer, got {round!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise LedgerError(f"steps must be a non-negative integer, got {steps!r}")
        epsilon = float(epsilon)
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise LedgerError(
                f"epsilon must be a finite number >= 0, got {epsilon}; a run "
                "without DP has no finite epsilon and is not recorded"
            )
        grant = self.grant_of(run)
        if grant is None:
            raise LedgerError(
                f"job {run} has no grant in {self.path}: its grant is recorded "
                "at its first round, before any spend (fedseal.client.budget.grant)"
            )
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
        if self.has_round(run, round) and not evaluation:
            log.warning(
                "round %d of run %s is trained again (the server lost its result); the extra spend counts",
                round,
                run,
            )
        if steps < self.steps_done(run) or epsilon < self.epsilon_spent(run) * (1 - 1e-9):
            raise LedgerError(
                f"run {run} already has steps={self.steps_done(run)}, "
                f"epsilon={self.epsilon_spent(run)} in {self.path}; round {round} reports "
                f"steps={steps}, epsilon={epsilon}, which are cumulative and cannot go down: "
                "start from ledger.steps_done(run)"
            )
        if epsilon > grant.epsilon:
            raise LedgerError(
                f"round {round} of job {run} would bring its epsilon to "
                f"{_num(epsilon)}, over its grant of {_num(grant.epsilon)}"
            )
        after = {**self._spends(), run: Budget(epsilon, grant.delta)}
        self._check_total(
            sum(b.epsilon for b in after.values()),
            sum(b.delta for b in after.values()),
            f"recording round {round} of job {run}",
        )
        self._check_unchanged()
        entry = LedgerEntry(
            run,
            round,
            steps,
            epsilon,
            _now(),
            float(noise_multiplier),
            float(sample_rate),
            grant.delta,
            _mechanism(mechanism),
        )
        self._entries.append(entry)
        self._commit(self._entries.pop)
        return entry

    def raise_total(self, epsilon: float, delta: float, by: str, reason: str) -> Raise:
        """Raise the site's total budget to ``(epsilon, delta)``, recording who, when and why.

        Neither number may go down, and one must go up.

        Raises
        ------
        LedgerError
            If the new total is invalid or not a raise, ``by`` or ``reason``
            is empty, or the file changed since it was opened.
        """
        new = Budget.checked(epsilon, delta)
        by, reason = str(by).strip(), str(reason).strip()
        if not by or not reason:
            raise LedgerError(
                "a raise records who raised the total and why: give --by NAME and --reason TEXT"
            )
        old = self.total
        if new.epsilon < old.epsilon or new.delta < old.delta or new.isclose(old):
            raise LedgerError(
                f"the total is epsilon {_num(old.epsilon)}, delta {_num(old.delta)}; a raise "
                f"must not lower either and must raise one (asked epsilon {_num(new.epsilon)}, "
                f"delta {_num(new.delta)})"
            )
        self._check_unchanged()
        raised = Raise(_now(), by, reason, old, new)
        self._raises.append(raised)
        self.total = new

        def undo() -> None:
            self._raises.pop()
            self.total = old

        self._commit(undo)
        log.warning(
            "site %s: total budget raised from epsilon %s, delta %s to epsilon %s, delta %s by %s: %s",
            self.site,
            _num(old.epsilon),
            _num(old.delta),
            _num(new.epsilon),
            _num(new.delta),
            by,
            reason,
        )
        return raised

    def _check_total(self, epsilon: float, delta: float, what: str) -> None:
        """Refuse a change that takes ``epsilon`` or ``delta`` over the total."""
        if epsilon > self.total.epsilon or delta > self.total.delta:
            raise LedgerError(
                f"{what} would take this site to epsilon {_num(epsilon)}, delta {_num(delta)}, "
                f"over its total epsilon {_num(self.total.epsilon)}, delta "
                f"{_num(self.total.delta)}; the ledger refuses it"
            )

    def _check_unchanged(self) -> None:
        """Refuse to write over a file that changed since this object read or wrote it."""
        try:
            on_disk = json.loads(self.path.read_bytes().decode("utf-8")).get("mac")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            on_disk = None
        if on_disk != self._mac:
            raise LedgerError(
                f"the ledger at {self.path} changed since it was opened (another "
                "process, or an edit); reopen it with PrivacyLedger.open"
            )

    def _commit(self, undo: Callable[[], Any]) -> None:
        """Write the change made in memory; ``undo`` it there if the write fails."""
        try:
            self._write()
        except BaseException:
            undo()
            raise

    def _body(self, seq: int) -> dict[str, Any]:
        return {
            "version": VERSION,
            "site": self.site,
            "total": asdict(self.total),
            "seq": seq,
            "raises": [asdict(r) for r in self._raises],
            "grants": [asdict(g) for g in self._grants],
            "entries": [_entry_body(e) for e in self._entries],
        }

    def encode(self, seq: int) -> tuple[bytes, str]:
        """The file's bytes as write ``seq`` (body and MAC, sorted keys, indented), and the MAC."""
        body = self._body(seq)
        body["mac"] = mac(self._key, LEDGER_CONTEXT, self._body(seq))
        data = json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n"
        return data.encode("utf-8"), body["mac"]

    def _write(self, create: bool = False) -> None:
        """Ledger first (one write ahead), then the counter: see :mod:`fedseal.client.ledger_seal`."""
        seq = self.seq + 1
        data, file_mac = self.encode(seq)
        if create and self.path.exists():
            raise LedgerError(f"{self.path} appeared while the ledger was being created; reopen it")
        try:
            atomic_write(self.path, data)
            self._advance_counter(seq, file_mac)
        except OSError as exc:
            # seq and mac stay as they were: if only the counter failed, the file is one
            # write ahead (which a reopen accepts) and this object refuses to write over it.
            raise LedgerError(
                f"cannot write the privacy ledger {self.path} or its counter "
                f"({exc}): free disk space or fix the permissions of the ledger's "
                "and the key's folders"
            ) from None
        self.seq, self._mac = seq, file_mac

    def _advance_counter(self, seq: int, ledger_mac: str) -> None:
        spent = self.spent()
        write_counter(
            counter_path(self.key_path),
            self._key,
            Counter(self.site, seq, ledger_mac, spent.epsilon, spent.delta),
        )


def _mechanism(value: Any) -> dict[str, float] | None:
    """An entry's mechanism: None, or its parameters as numbers (ValueError otherwise)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(value)
    return {str(k): float(v) for k, v in value.items()}


def _entry_body(entry: LedgerEntry) -> dict[str, Any]:
    """An entry as written: without ``mechanism`` under local noise (the version-3 format)."""
    body = asdict(entry)
    if body["mechanism"] is None:
        del body["mechanism"]
    return body


def _corrupt(path: Path, why: str) -> LedgerError:
    return LedgerError(
        f"the ledger at {path} was modified or corrupted ({why}); restore it from "
        "backup; it is never reset automatically"
    )


def _read_seal(key_path: Path) -> tuple[bytes, Counter | None]:
    """The ledger key and its counter (None if missing), as a :class:`LedgerError` if unreadable."""
    try:
        key = read_key(key_path)
        return key, read_counter(counter_path(key_path), key)
    except SealError as exc:
        raise LedgerError(str(exc)) from None


def _require_counter(path: Path, key_path: Path, counter: Counter | None) -> Counter:
    """The counter, or a refusal: a key without its counter is never a site's first use."""
    if counter is not None:
        return counter
    where = counter_path(key_path)
    if path.exists():
        raise LedgerError(
            f"the ledger at {path} has no counter ({where} is missing), so an "
            "older copy could not be told from the latest; restore the counter. "
            + _recover_hint(path, key_path)
        )
    raise LedgerError(
        f"the ledger key {key_path} is there but its counter ({where}) and the ledger ({path}) "
        "are not: they were deleted or moved, and starting afresh would forget the spend they "
        "recorded. Put them back. If this key never had a ledger (a crash while it was being "
        f"made), run `fedseal ledger recover --ledger {path} --ledger-key {key_path} --site NAME "
        "--epsilon E --delta D` to start an empty ledger on purpose"
    )


def _refuse_gone(path: Path, key_path: Path, counter: Counter) -> None:
    """Refuse a missing ledger that the counter says was written."""
    if counter.ledger_mac:
        raise LedgerError(
            f"the ledger at {path} is gone, but its counter ({counter_path(key_path)}) "
            f"remembers {counter.seq} writes and a spend of epsilon {counter.epsilon:.4g}, "
            f"delta {counter.delta:.3g}: it was deleted or moved. Put it back, or: "
            + _recover_hint(path, key_path)
        )


def recover(
    path: str | Path,
    key_path: str | Path,
    site: str | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
) -> PrivacyLedger:
    """Deliberately accept an older copy of the ledger, or a lost one, without forgetting spend.

    The ledger at ``path`` (an older genuine copy, MAC verified) or, when it is
    gone, a new empty one for ``site`` with total ``(epsilon, delta)``, gets
    one entry (run ``carried-forward-<time>``) holding the difference between
    the spend the counter remembers and the spend the ledger holds, so the
    site's recorded spend never goes down. Its steps and plan are unknown, so
    a job that was running goes on as a new one.

    Where the counter is missing too (the key kept, the counter lost), there
    is nothing to compare with: the ledger at ``path`` is taken as the latest
    (spend recorded after it, if it is an older copy, is forgotten), or, when
    there is none, an empty one is started. This is the site operator's
    deliberate decision, and the warning says so.

    Raises
    ------
    LedgerError
        If the key is missing, the ledger fails its MAC (restore a genuine copy
        first), or a lost ledger's site and total are not given.
    """
    path, key_path = Path(path), Path(key_path)
    key, counter = _read_seal(key_path)
    if path.exists():
        ledger = PrivacyLedger._read(path, key_path, key)
    else:
        if site is None or epsilon is None or delta is None:
            raise LedgerError(
                f"the ledger at {path} is gone: give the site's name, epsilon and "
                "delta to start a new one" + (" that carries the counter's totals" if counter else "")
            )
        ledger = PrivacyLedger(
            path, key_path, key, site, Budget.checked(epsilon, delta), [], counter.seq if counter else 0, ""
        )
    if counter is None:
        ledger._write()
        log.warning(
            "ledger %s recovered WITHOUT a counter: it is taken as the latest (spend "
            "recorded after it, if it is an older copy, is forgotten); total spent "
            "epsilon %.4g, delta %.3g",
            path,
            ledger.epsilon_spent(),
            ledger.delta_spent(),
        )
        return ledger
    if ledger.site != counter.site:
        raise LedgerError(f"the counter belongs to site {counter.site!r}, the ledger to {ledger.site!r}")
    spent = ledger.spent()
    missing_eps = max(0.0, counter.epsilon - spent.epsilon)
    missing_delta = max(0.0, counter.delta - spent.delta)
    ledger.seq = max(ledger.seq, counter.seq)
    if missing_eps > 0 or missing_delta > 0:
        time = _now()
        ledger._entries.append(
            LedgerEntry(f"{CARRIED_FORWARD}-{time}", 0, 0, missing_eps, time, delta=missing_delta)
        )
    ledger._write()
    log.warning(
        "ledger %s recovered: epsilon %.4g and delta %.3g the counter remembered beyond "
        "this copy are carried forward; total now epsilon %.4g, delta %.3g",
        path,
        missing_eps,
        missing_delta,
        ledger.epsilon_spent(),
        ledger.delta_spent(),
    )
    return ledger


__all__ = ["Budget", "Grant", "LedgerEntry", "LedgerError", "PrivacyLedger", "Raise", "VERSION", "recover"]
