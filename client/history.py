"""A job's accountant history at a site: the ``(sigma, q, steps)`` of every round it took part in.

An LP-FT job (:mod:`fedseal.common.lora_rule`) steps at the probe's rate in its
first rounds and at the adapter phase's in its last, and a site may sit out any
round, so its spend is not a function of one step count: it is the accountant's
epsilon of the job's history. That history is read from what the site has
already committed for the job, never from the server:

* with a ledger, its entries: each says, after a round, the job's cumulative
  steps and the ``(noise multiplier, sampling rate)`` of that round's steps;
* without one (a simulation, or a site that keeps no ledger), the run's
  ``Context.state``, where :func:`remember` keeps the same numbers.
"""

from __future__ import annotations

from typing import cast

from flwr.app import Context, MetricRecord

from fedseal.client.ledger import PrivacyLedger
from fedseal.common.phases import Phase, epsilon_of
from fedseal.common.privacy import DPPlan

PROGRESS = "fedseal.progress"  # context.state record: DP steps taken so far, and their phases (no ledger)


def _marks(context: Context) -> list[tuple[int, float, float]]:
    """The run's state's ``(cumulative steps, sigma, q)`` after each committed round, in order."""
    if PROGRESS not in context.state.metric_records:
        return []
    record = context.state.metric_records[PROGRESS]
    if "at" not in record:
        return []
    at, noise, rate = (cast(list, record[k]) for k in ("at", "noise", "rate"))
    return [(int(a), float(n), float(r)) for a, n, r in zip(at, noise, rate, strict=True)]


def remember(context: Context, steps: int, noise_multiplier: float, sample_rate: float) -> None:
    """Keep, in the run's state, that the job now has ``steps`` steps, the last at ``(sigma, q)``."""
    marks = [*_marks(context), (int(steps), float(noise_multiplier), float(sample_rate))]
    context.state[PROGRESS] = MetricRecord(
        {
            "steps": int(steps),
            "at": [m[0] for m in marks],
            "noise": [m[1] for m in marks],
            "rate": [m[2] for m in marks],
        }
    )


def job_history(ledger: PrivacyLedger | None, context: Context, job: str, plan: DPPlan) -> list[Phase]:
    """The phases of ``job``'s steps taken so far at this site, in order.

    A recorded round without its ``(sigma, q)`` (a ledger entry written before
    they were recorded) counts at the plan's own.
    """
    if ledger is not None:
        marks = [(e.steps, e.noise_multiplier, e.sample_rate) for e in ledger.entries if e.run == str(job)]
    else:
        marks = _marks(context)
    history, before = [], 0
    for steps, noise, rate in marks:
        if noise <= 0:
            noise, rate = plan.noise_multiplier, plan.sample_rate
        history.append(Phase(float(noise), float(rate), int(steps) - before))
        before = max(before, int(steps))
    return history


def epsilon_after(
    ledger: PrivacyLedger | None, context: Context, job: str, plan: DPPlan, step: Phase
) -> float:
    """``job``'s epsilon once ``step`` (the round's steps at its phase) is added to its history."""
    return epsilon_of([*job_history(ledger, context, job, plan), step], plan.delta, plan.accountant)


__all__ = ["PROGRESS", "epsilon_after", "job_history", "remember"]
