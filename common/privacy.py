"""Privacy accounting for one site's DP-SGD, on Opacus's accountants.

A site's plan is fixed before its first round: with Poisson sampling rate ``q``
and the run's planned number of steps, the noise multiplier is the smallest one
(found by Opacus's calibration) whose total spend stays within the site's
target (epsilon, delta). Every phase of training (the probe's feature-mean
release and its DP-SGD steps, see :mod:`fedseal.common.dp_rule`) is the same mechanism,
a Poisson-sampled Gaussian sum at ``q`` and that noise, so all of them compose
in one accountant history and one integer, the steps taken, gives the spend.
Spend so far is recomputed from that count, so it never depends on trusting
anyone else's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants.utils import get_noise_multiplier

from fedseal.common.buckets import check_bucket
from fedseal.common.errors import FedsealError
from fedseal.common.phases import Phase, epsilon_spent


class PrivacyError(FedsealError, ValueError):
    """A privacy budget cannot be met or has been used up."""

    code = "privacy.error"


@dataclass(frozen=True)
class DPPlan:
    """A site's DP-SGD settings for the whole run."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int  # steps (of every phase) the budget was calibrated for
    target_epsilon: float
    delta: float
    accountant: str
    adapter: Phase | None = None
    """LP-FT's adapter phase (its noise, rate and planned steps; :mod:`fedseal.common.lora_rule`):
    rounds of that phase step at its ``(sigma, q)``; the fields above are the probe's phases'."""


MAX_SAMPLE_RATE = 0.5
"""A site samples at most half its examples per step, whatever batch a run asks for."""


def sample_rate_for(bucket: int, batch_size: int) -> float:
    """Poisson sampling rate of a site of size bucket ``bucket`` asked for ``batch_size``.

    ``1 / ceil(bucket / batch_size)``, at most :data:`MAX_SAMPLE_RATE`: a
    function of the bucket (never the exact count,
    :func:`fedseal.common.buckets.size_bucket`), so the rate, and the noise
    calibrated for it, say nothing finer about the site's size. A batch the run
    asks for is a request: the site rounds it to this rate.
    """
    return min(MAX_SAMPLE_RATE, 1.0 / math.ceil(check_bucket(bucket) / batch_size))


def check_delta(bucket: int, delta: float) -> None:
    """Raise PrivacyError unless ``delta`` is below ``1 / (2 * bucket)`` (see :func:`plan_site`)."""
    check_bucket(bucket)
    if delta >= 1.0 / (2 * bucket):
        raise PrivacyError(
            f"delta={delta} is not below 1/n for a site of {bucket} to {2 * bucket - 1} "
            "examples; choose delta < 1/n (1e-5 or smaller is usual)"
        )


@lru_cache(maxsize=64)  # pure in its arguments; calibration takes seconds
def plan_site(
    bucket: int, *, batch_size: int, steps: int, epsilon: float, delta: float, accountant: str = "prv"
) -> DPPlan:
    """Calibrate the noise so the site's whole planned run spends at most ``epsilon``.

    ``bucket`` is the site's size bucket (:func:`fedseal.common.buckets.size_bucket`):
    the site holds between ``bucket`` and ``2 * bucket - 1`` examples.

    Raises
    ------
    PrivacyError
        If delta is not below ``1 / (2 * bucket)``, which bounds ``1/n`` for
        every size in the bucket (a delta that large allows leaking whole
        records), or no noise meets the budget.
    ValueError
        If ``bucket`` is not a size bucket.
    """
    check_delta(bucket, delta)
    q = sample_rate_for(bucket, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            noise = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        except ValueError as exc:
            raise PrivacyError(
                f"cannot reach epsilon={epsilon} at delta={delta} over {steps} steps "
                f"(sampling rate {q:.4f}): {exc}"
            ) from None
    # Opacus's calibration targets epsilon within a tolerance; never exceed it.
    while epsilon_spent(noise, q, steps, delta, accountant) > epsilon:
        noise *= 1.01
    return DPPlan(noise, q, steps, epsilon, delta, accountant)
