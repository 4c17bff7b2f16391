"""Noise calibration and accounting on Opacus's real accountants."""

from __future__ import annotations

import pytest

from fedseal.common.privacy import PrivacyError, epsilon_spent, plan_site, sample_rate_for


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("n,rounds,steps,epsilon", [(800, 3, 20, 8.0), (6000, 10, 30, 2.0)])
def test_planned_spend_is_within_and_close_to_target(accountant, n, rounds, steps, epsilon):
    plan = plan_site(n, batch_size=32, steps=steps * rounds, epsilon=epsilon, delta=1e-5,
                     accountant=accountant)
    spent = epsilon_spent(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, 1e-5, accountant)
    assert 0.8 * epsilon < spent <= epsilon
    # Spend grows with every round and is positive from the first step.
    per_round = [epsilon_spent(plan.noise_multiplier, plan.sample_rate, r * steps, 1e-5, accountant)
                 for r in range(1, rounds + 1)]
    assert 0 < per_round[0] and per_round == sorted(per_round)


def test_more_rounds_need_more_noise():
    short = plan_site(1000, batch_size=32, steps=20, epsilon=4, delta=1e-5, accountant="rdp")
    long = plan_site(1000, batch_size=32, steps=200, epsilon=4, delta=1e-5, accountant="rdp")
    assert long.noise_multiplier > short.noise_multiplier


def test_sample_rate_matches_opacus_loader():
    assert sample_rate_for(100, 32) == pytest.approx(1 / 4)


def test_refuses_delta_not_below_one_over_n():
    with pytest.raises(PrivacyError, match="delta=0.05 is not below 1/n"):
        plan_site(50, batch_size=8, steps=1, epsilon=1, delta=0.05)


def test_refuses_batch_covering_the_site():
    with pytest.raises(PrivacyError, match="lower --batch-size"):
        plan_site(20, batch_size=32, steps=1, epsilon=1, delta=1e-3)
