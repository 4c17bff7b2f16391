"""Committing a round's privacy spend: the one step every train reply depends on.

:func:`commit_round` records the round in the site's ledger (or, in a
simulation without a ledger, in the run's ``Context.state``) and returns a
:class:`CommittedRound`; :func:`fedseal.client.reply.train_reply` accepts nothing
else. A ``CommittedRound`` cannot be made any other way (its constructor
checks a module-private token), so a reply cannot be built before the spend
is on disk. It carries the digest of the update and the weight it was
committed for, so the reply can send only that update, for that job and round.

Where a ledger exists it is the one record of the steps taken; the run's
``Context.state`` keeps them only when there is none (a simulation, or a
round trained without differential privacy, which has no spend to record).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Context

from fedseal.client.history import PROGRESS, remember
from fedseal.client.ledger import PrivacyLedger
from fedseal.common.records import state_digest

_COMMITTED = object()


@dataclass(frozen=True)
class CommittedRound:
    """A round whose spend is recorded; the only source of a train reply's privacy numbers.

    Attributes
    ----------
    site, job, round
        Who trained what.
    update_digest, weight
        :func:`~fedseal.common.records.state_digest` of the update this round
        committed to send, and its aggregation weight.
    steps
        DP-SGD steps taken in the job so far, this round included.
    epsilon, delta
        The site's total epsilon and delta after this round (every job,
        basic composition); meaningless when ``private`` is false.
    noise_multiplier, sample_rate
        The job's noise multiplier and Poisson rate (0 without DP).
    private
        Whether the round was trained with differential privacy.
    """

    site: str
    job: str
    round: int
    steps: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    private: bool
    update_digest: str
    weight: float
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Refuse to exist unless :func:`commit_round` made it."""
        if self._token is not _COMMITTED:
            raise TypeError(
                "a CommittedRound is made only by fedseal.client.spend.commit_round, "
                "after the spend is recorded"
            )


def steps_done(ledger: PrivacyLedger | None, context: Context, job: str) -> int:
    """DP-SGD steps this site took in ``job`` so far: the ledger's count, or (none) the run's state."""
    if ledger is not None:
        return ledger.steps_done(job)
    if PROGRESS in context.state:
        steps = context.state.metric_records[PROGRESS]["steps"]
        return int(steps) if isinstance(steps, (int, float)) else 0
    return 0


def other_jobs_epsilon(ledger: PrivacyLedger | None, job: str) -> float:
    """Epsilon other jobs spent on this site's data (sequential composition)."""
    return ledger.epsilon_spent() - ledger.epsilon_spent(job) if ledger is not None else 0.0


def commit_round(
    site: str,
    ledger: PrivacyLedger | None,
    context: Context,
    job: str,
    round: int,
    steps: int,
    job_epsilon: float | None,
    job_delta: float,
    update: Mapping[str, np.ndarray],
    weight: float,
    *,
    noise_multiplier: float = 0.0,
    sample_rate: float = 0.0,
    evaluation: bool = False,
    mechanism: Mapping[str, float] | None = None,
) -> CommittedRound:
    """Record the round's spend (ledger first, durably) and return the committed round.

    ``job_epsilon`` is the job's cumulative epsilon after ``steps`` steps, or
    None for a round trained without differential privacy (nothing to record
    in the ledger; the reply then says the round was not private);
    ``job_delta`` is the job's delta where there is no ledger (with one, the
    ledger records the job's granted delta). ``update`` and ``weight`` are
    what the reply may send; the steps go to the run's ``Context.state`` only
    when there is no ledger. ``mechanism`` (distributed noise) is recorded with
    the entry.

    Raises
    ------
    fedseal.client.ledger.LedgerError
        If the ledger refuses the entry; nothing is committed then.
    """
    private = job_epsilon is not None
    if private and ledger is not None:
        ledger.record(
            job,
            round,
            steps,
            job_epsilon,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            evaluation=evaluation,
            mechanism=dict(mechanism) if mechanism is not None else None,
        )
    if ledger is None:
        remember(context, steps, noise_multiplier, sample_rate)
    epsilon = other_jobs_epsilon(ledger, job) + job_epsilon if job_epsilon is not None else float("inf")
    delta = ledger.delta_spent() if private and ledger is not None else job_delta
    return CommittedRound(
        site,
        str(job),
        int(round),
        int(steps),
        float(epsilon),
        float(delta),
        float(noise_multiplier),
        float(sample_rate),
        private,
        state_digest(update),
        float(weight),
        _COMMITTED,
    )


__all__ = ["CommittedRound", "PROGRESS", "commit_round", "other_jobs_epsilon", "steps_done"]
