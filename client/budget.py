"""How much of a site's privacy budget a job gets: the grant, decided once at its first round.

A site's ``epsilon`` and ``delta`` (``fedseal client --epsilon --delta``, kept
in its ledger) are its *total* over all jobs. A run asks for a share: its
config's ``epsilon`` and ``delta``. At a job's first round :func:`grant`

1. refuses a run asking more epsilon than the site's policy lets one run have
   (``--max-run-epsilon``: :data:`~fedseal.common.refusals.Code.POLICY_RUN_EPSILON`);
2. refuses a run asking more epsilon than is left of the total, or arriving
   when no delta is left
   (:data:`~fedseal.common.refusals.Code.BUDGET_EXHAUSTED`; the site's log says
   how much is left and what to do);
3. grants ``epsilon_j`` = the run's epsilon and
   ``delta_j = min(run's delta, remaining_delta * epsilon_j / remaining_epsilon)``:
   each job takes at most its epsilon's share of the delta that is left, so
   the grants' deltas never add up past the total delta, whatever jobs come
   (the last job that fits takes what is left of both);
4. records the grant in the MACed ledger before any of the job's spend
   (:meth:`~fedseal.client.ledger.PrivacyLedger.record_grant`, which checks
   the total once more).

At later rounds the recorded grant is returned as it is (never recomputed, so
a raise of the total or other jobs do not move a running job's calibration);
a run whose epsilon or delta changed since is refused
(:data:`~fedseal.common.refusals.Code.PLAN_CHANGED`).

A site without a ledger (a simulation, where one user plays every site) has
no jobs before this one: its total is the run's ``(epsilon, delta)`` and the
job is granted all of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedseal.client.ledger import Budget, Grant, PrivacyLedger
from fedseal.client.site import SitePolicy
from fedseal.common.refusals import Code, Refusal

_SLACK = 1e-9  # a run may ask for what `fedseal ledger show` printed as left (a sum's rounding)


def _num(value: float) -> str:
    return f"{value:.10g}"


def grant(
    ledger: PrivacyLedger | None,
    job: str,
    asked_epsilon: float,
    asked_delta: float,
    policy: SitePolicy,
    total: Budget,
    *,
    check: Callable[[float, float], object] | None = None,
    record: bool = True,
) -> Grant:
    """The job's grant: the recorded one, or (first round) a new one, recorded before any spend.

    Parameters
    ----------
    ledger
        The site's open ledger (its total is the one it was opened with), or
        None for a site without one.
    job
        The job's id, as the server names it.
    asked_epsilon, asked_delta
        The run's ``epsilon`` and ``delta`` (the server's config).
    policy
        The site's policy (its ``max_run_epsilon``).
    total
        The site's total budget; with a ledger it is the ledger's (which
        :meth:`~fedseal.client.ledger.PrivacyLedger.open` checked against it).
    check
        Called with a new grant's ``(epsilon, delta)`` before it is recorded;
        it raises to refuse the grant (no noise level meets it, say), and
        nothing is recorded then.
    record
        Whether a new grant is written to the ledger; false: computed and
        checked only (what the job would get), the ledger untouched.

    Returns
    -------
    Grant
        What the job may spend; its ``delta`` is the delta the job's
        accountant uses.

    Raises
    ------
    fedseal.common.refusals.Refusal
        ``POLICY_RUN_EPSILON``, ``BUDGET_EXHAUSTED`` or ``PLAN_CHANGED`` (see
        the module's docstring).
    fedseal.client.ledger.LedgerError
        If the ledger refuses the grant or cannot write it.
    """
    asked_epsilon, asked_delta = float(asked_epsilon), float(asked_delta)
    if asked_epsilon > policy.max_run_epsilon:
        raise Refusal(
            Code.POLICY_RUN_EPSILON,
            f"the run asks for epsilon {_num(asked_epsilon)}, but this site grants one "
            f"run at most {_num(policy.max_run_epsilon)} (--max-run-epsilon); the "
            "server must lower the run's epsilon, or the site operator must raise "
            "--max-run-epsilon",
            setting="epsilon",
            asked=asked_epsilon,
            limit=policy.max_run_epsilon,
        )
    recorded = ledger.grant_of(job) if ledger is not None else None
    if recorded is not None:
        _check_unchanged_ask(recorded, asked_epsilon, asked_delta)
        return recorded
    if ledger is not None and str(job) in ledger.jobs():  # rounds recorded, no grant
        raise Refusal(
            Code.PLAN_CHANGED,
            f"job {job} has spend in the ledger at {ledger.path} but no grant (it "
            "started under an older fedseal, or was carried forward by a recovery); "
            "it cannot go on: start a new run",
        )
    if ledger is not None:  # the ledger's total is the site's: open() checked it
        total, held = ledger.total, ledger.held()
    else:
        held = Budget(0.0, 0.0)
    left = Budget(total.epsilon - held.epsilon, total.delta - held.delta)
    _check_left(ledger, left, total, asked_epsilon)
    epsilon = _fit(held.epsilon, min(asked_epsilon, left.epsilon), total.epsilon)
    delta = _fit(held.delta, min(asked_delta, left.delta * epsilon / left.epsilon), total.delta)
    if check is not None:
        check(epsilon, delta)
    if ledger is None or not record:
        return Grant(str(job), epsilon, delta, asked_delta, "")
    return ledger.record_grant(job, epsilon, delta, asked_delta)


def _fit(held: float, share: float, total: float) -> float:
    """``share``, less float rounding's last digits if ``held + share`` would pass ``total``."""
    share = min(share, total - held)
    while share > 0 and held + share > total:
        share = math.nextafter(share, 0.0)
    return share


def _check_unchanged_ask(recorded: Grant, asked_epsilon: float, asked_delta: float) -> None:
    """A job's later rounds must ask for what its first did."""
    for setting, asked, then in (
        ("epsilon", asked_epsilon, recorded.epsilon),
        ("delta", asked_delta, recorded.asked_delta),
    ):
        if not math.isclose(asked, then, rel_tol=_SLACK):
            raise Refusal(
                Code.PLAN_CHANGED,
                f"job {recorded.job} asked for {setting} {_num(then)} at its first "
                f"round and was granted epsilon {_num(recorded.epsilon)}, delta "
                f"{_num(recorded.delta)}; it now asks for {_num(asked)}. A job's "
                "grant is never recomputed: start a new run",
                setting=setting,
                asked=asked,
            )


def _check_left(ledger: PrivacyLedger | None, left: Budget, total: Budget, asked_epsilon: float) -> None:
    """Refuse a new job that what is left of the total cannot cover."""
    if (
        asked_epsilon <= left.epsilon * (1 + _SLACK)
        and left.epsilon > total.epsilon * _SLACK
        and left.delta > total.delta * _SLACK
    ):
        return
    jobs = len(ledger.jobs()) if ledger is not None else 0
    files = (
        f"--ledger {ledger.path} --ledger-key {ledger.key_path}"
        if ledger is not None
        else "--ledger LEDGER --ledger-key KEY"
    )
    short = (
        "no delta is left"
        if left.delta <= total.delta * _SLACK
        else f"it asks for epsilon {_num(asked_epsilon)}"
    )
    raise Refusal(
        Code.BUDGET_EXHAUSTED,
        f"this site's total budget is epsilon {_num(total.epsilon)}, delta {_num(total.delta)}; "
        f"its {jobs} earlier job(s) hold all but epsilon {_num(max(left.epsilon, 0.0))}, delta "
        f"{_num(max(left.delta, 0.0))} (fedseal ledger show lists them), and {short}. The "
        "server can run with epsilon at most what is left, or the site operator can raise the "
        f"total on purpose: fedseal ledger raise {files} --epsilon NEW [--delta NEW] --by NAME "
        "--reason TEXT, then restart fedseal client with the new --epsilon and --delta",
        asked=asked_epsilon,
        remaining=max(left.epsilon, 0.0),
    )


__all__ = ["grant"]
