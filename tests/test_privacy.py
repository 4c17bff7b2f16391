"""Noise calibration and accounting on Opacus's real accountants."""

from __future__ import annotations

import pytest

from fedseal.common.buckets import size_bucket
from fedseal.common.privacy import MAX_SAMPLE_RATE, PrivacyError, epsilon_spent, plan_site, sample_rate_for


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("n,rounds,steps,epsilon", [(800, 3, 20, 8.0), (6000, 10, 30, 2.0)])
def test_planned_spend_is_within_and_close_to_target(accountant, n, rounds, steps, epsilon):
    plan = plan_site(
        size_bucket(n),
        batch_size=32,
        steps=steps * rounds,
        epsilon=epsilon,
        delta=1e-5,
        accountant=accountant,
    )
    spent = epsilon_spent(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, 1e-5, accountant)
    assert 0.8 * epsilon < spent <= epsilon
    # Spend grows with every round and is positive from the first step.
    per_round = [
        epsilon_spent(plan.noise_multiplier, plan.sample_rate, r * steps, 1e-5, accountant)
        for r in range(1, rounds + 1)
    ]
    assert 0 < per_round[0] and per_round == sorted(per_round)


def test_more_rounds_need_more_noise():
    short = plan_site(512, batch_size=32, steps=20, epsilon=4, delta=1e-5, accountant="rdp")
    long = plan_site(512, batch_size=32, steps=200, epsilon=4, delta=1e-5, accountant="rdp")
    assert long.noise_multiplier > short.noise_multiplier


def test_the_sampling_rate_depends_on_the_size_bucket_alone():
    """1 / ceil(bucket / batch), at most one half: sites of 64 to 127 examples sample alike."""
    assert sample_rate_for(size_bucket(100), 32) == sample_rate_for(size_bucket(127), 32) == 1 / 2
    assert sample_rate_for(size_bucket(1000), 32) == pytest.approx(1 / 16)
    assert sample_rate_for(size_bucket(20), 32) == MAX_SAMPLE_RATE  # a batch asked for is rounded


def test_an_exact_count_is_refused_where_a_bucket_is_expected():
    with pytest.raises(ValueError, match="size bucket"):
        plan_site(1000, batch_size=32, steps=20, epsilon=4, delta=1e-5)


def test_refuses_delta_not_below_one_over_n_for_every_size_in_the_bucket():
    """A site of 32 to 63 examples needs delta below 1/64 (below 1/n for all of them)."""
    with pytest.raises(PrivacyError, match="delta=0.02 is not below 1/n for a site of 32 to 63"):
        plan_site(size_bucket(50), batch_size=8, steps=1, epsilon=1, delta=0.02)
    plan_site(size_bucket(50), batch_size=8, steps=1, epsilon=1, delta=0.015)
