"""A job's DP plan at a site: its grant, its calibrated noise, and the check that a step fits.

The plan is fixed at a job's first round: the site grants the job a share of its
total budget (:func:`fedseal.client.budget.grant`) and calibrates the noise so
that every step the job may take (training, and one evaluation step per round
where both the run and the site allow federated evaluation) spends at most the
grant. Every later round recomputes the same plan (remembered in the run's
``Context.state``) and checks that the ledger recorded it, and that the next
steps fit the grant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from fedseal.client.budget import grant
from fedseal.client.history import epsilon_after
from fedseal.client.ledger import Budget, PrivacyLedger
from fedseal.client.site import SiteSettings
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import Recipe
from fedseal.common.lora_rule import plan_lpft, round_phase
from fedseal.common.phases import Phase
from fedseal.common.privacy import DPPlan, PrivacyError, plan_site
from fedseal.common.refusals import Code, Refusal

PLAN = "fedseal.plan"  # context.state record: the run's calibrated DP plan


def evaluation_planned(cfg: FedConfig, site: SiteSettings) -> bool:
    """Whether this job's budget also covers one evaluation step per round."""
    return cfg.federated_eval and site.policy.federated_eval == "on"


def planned_steps(cfg: FedConfig, rec: Recipe, site: SiteSettings) -> int:
    """Steps the job's noise is calibrated for at the probe's (the plan's own) rate: training,
    and evaluation where both sides allow it; an LP-FT run's adapter steps are planned apart."""
    adapter = rec.adapter_rounds * rec.adapter_steps
    return rec.steps_through(cfg.rounds) - adapter + (cfg.rounds if evaluation_planned(cfg, site) else 0)


def calibrated(
    context: Context, cfg: FedConfig, rec: Recipe, steps: int, bucket: int, budget: float, delta: float
) -> DPPlan:
    """``plan_site``, remembered in the run's Context.state.

    Each message runs in a fresh process in a deployment, so the in-process
    cache of :func:`plan_site` is empty every round; calibrating again (seconds
    with the PRV accountant) would give the same numbers.

    An LP-FT run (``rec.adapter_rounds``) calibrates both phases together
    (:func:`fedseal.common.lora_rule.plan_lpft`): ``steps`` are then the steps
    at the probe's rate, the adapter rounds' come from ``rec``.
    """
    key = repr(
        (bucket, rec.batch_size, steps, rec.adapter_rounds, rec.adapter_steps, budget, delta, cfg.accountant)
    )
    if PLAN in context.state and context.state[PLAN].get("key") == key:
        saved = context.state.config_records[PLAN]
        adapter = (
            Phase(
                float(str(saved["adapter-noise"])),
                float(str(saved["adapter-rate"])),
                int(str(saved["adapter-steps"])),
            )
            if "adapter-noise" in saved
            else None
        )
        return DPPlan(
            float(str(saved["noise-multiplier"])),
            float(str(saved["sample-rate"])),
            steps + (adapter.steps if adapter else 0),
            budget,
            delta,
            cfg.accountant,
            adapter=adapter,
        )
    try:
        plan = (
            plan_lpft(bucket, rec, steps, budget, delta, cfg.accountant)
            if rec.adapter_rounds
            else plan_site(
                bucket,
                batch_size=rec.batch_size,
                steps=steps,
                epsilon=budget,
                delta=delta,
                accountant=cfg.accountant,
            )
        )
    except PrivacyError as exc:  # e.g. delta not below 1/n for the bucket
        raise Refusal(Code.PLAN_INFEASIBLE, str(exc), setting="epsilon", asked=cfg.epsilon) from None
    record: dict[str, Any] = {
        "key": key,
        "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate,
    }
    if plan.adapter is not None:
        record.update(
            {
                "adapter-noise": plan.adapter.noise_multiplier,
                "adapter-rate": plan.adapter.sample_rate,
                "adapter-steps": plan.adapter.steps,
            }
        )
    context.state[PLAN] = ConfigRecord(record)
    return plan


def job_plan(
    context: Context,
    cfg: FedConfig,
    rec: Recipe,
    site: SiteSettings,
    bucket: int,
    ledger: PrivacyLedger | None,
    job: str,
    server_round: int,
    *,
    evaluation: bool = False,
    record: bool = True,
) -> DPPlan:
    """This job's DP plan, calibrated to its grant and checked to cover round ``server_round``.

    The round's steps (its training steps, or one evaluation step) at their
    phase (:func:`fedseal.common.lora_rule.round_phase`), added to the job's
    history at this site (:func:`fedseal.client.history.job_history`), must fit
    the grant.

    The plan's ``delta`` is the grant's. With ``record`` false a new job's
    grant is computed and checked but not written (a secure round checks that
    it could train before its cohort is known to hold; it records the grant
    only when it trains).

    Raises
    ------
    fedseal.common.refusals.Refusal
        If the budget, the policy or the calibration cannot cover the steps.
    """
    planned = planned_steps(cfg, rec, site)

    def calibrate(epsilon: float, delta: float) -> DPPlan:
        return calibrated(context, cfg, rec, planned, bucket, epsilon, delta)

    granted = grant(
        ledger,
        job,
        cfg.epsilon,
        cfg.delta,
        site.policy,
        Budget(site.epsilon, site.delta),
        check=calibrate,
        record=record,
    )
    plan = calibrate(granted.epsilon, granted.delta)
    recorded = ledger.plan_of(job) if ledger else None
    phases = [(plan.noise_multiplier, plan.sample_rate)]
    if plan.adapter is not None:  # a site that joins an LP-FT job late starts in its adapter phase
        phases.append((plan.adapter.noise_multiplier, plan.adapter.sample_rate))
    if recorded and not any(np.allclose(recorded, p, rtol=1e-9, atol=0) for p in phases):
        raise Refusal(
            Code.PLAN_CHANGED,
            f"this run started with noise multiplier {recorded[0]:.4f} and sample "
            f"rate {recorded[1]:.5f}, now {plan.noise_multiplier:.4f} and "
            f"{plan.sample_rate:.5f} (rounds, local steps, batch size or the data "
            "changed): the calibration cannot change mid-run; start a new run",
        )
    steps = 1 if evaluation else rec.steps_in_round(server_round)
    after = epsilon_after(
        ledger, context, job, plan, round_phase(plan, rec, None if evaluation else server_round, steps)
    )
    if after > granted.epsilon:
        raise Refusal(
            Code.BUDGET_ROUND,
            f"this step would bring job {job}'s epsilon to "
            f"{after:.3f}, over its grant of {granted.epsilon:g} at this site",
        )
    return plan


__all__ = ["PLAN", "calibrated", "evaluation_planned", "job_plan", "planned_steps"]
