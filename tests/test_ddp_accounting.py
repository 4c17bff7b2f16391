"""The accountant of the distributed discrete Gaussian, against direct computations.

* The two Poisson-summation facts the reduction rests on, checked on exact pmfs
  where their bounds are large enough to see.
* The whole accountant against the exact privacy loss of the discrete mechanism
  itself (1-D: the pmf of a sum of shares by convolution, Poisson-sampled, composed).
* Its Gaussian limit against Opacus (the local mode's accountant) and, for q = 1,
  the closed form of the Gaussian mechanism (Balle and Wang 2018).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy import integrate, optimize, stats

from fedseal.common.ddp import DdgMechanism, DdgSteps, DdpError, calibrate_noise_multiplier, epsilon_spent
from fedseal.common.ddp.accounting import kernel_deviation, sum_deviation

DELTA = 1e-5


def _dg_pmf(sigma: float) -> np.ndarray:
    """``N_Z(0, sigma^2)`` on ``[-K, K]``, ``K = 40 sigma + 5`` (the rest is below 1e-300)."""
    k = np.arange(-int(40 * sigma) - 5, int(40 * sigma) + 6)
    p = np.exp(-(k.astype(float) ** 2) / (2 * sigma**2))
    return p / p.sum()


def _sum_pmf(sigma: float, shares: int) -> np.ndarray:
    p = total = _dg_pmf(sigma)
    for _ in range(shares - 1):
        total = np.convolve(total, p)
    return total


@pytest.mark.parametrize("sigma,shares", [(1.0, 2), (1.0, 3), (0.8, 4), (0.6, 2)])
def test_a_sum_of_shares_is_within_the_bound_of_one_discrete_gaussian(sigma, shares) -> None:
    total = _sum_pmf(sigma, shares)
    k = np.arange(total.size) - total.size // 2
    ref = np.exp(-(k.astype(float) ** 2) / (2 * shares * sigma**2))
    ref /= ref.sum()
    centre = np.abs(k) <= 6 * math.sqrt(shares) * sigma  # where float64 resolves the ratio
    deviation = np.abs(np.log(total[centre] / ref[centre])).max()
    bound = 2 * sum_deviation(sigma, shares)
    assert deviation <= bound <= 50 * deviation


@pytest.mark.parametrize("variance,r", [(4.0, 0.5), (9.0, 0.6), (3.0, 0.7)])
def test_a_discrete_gaussian_is_a_noisy_rounding_of_a_continuous_one(variance, r) -> None:
    """``K(y) = N_Z(y, r^2)`` of ``N(0, S^2 - r^2)`` is within exp(±theta') of ``N_Z(0, S^2)``."""
    inner = math.sqrt(variance - r * r)
    lattice = np.arange(-60, 61)

    def kernel(y: float, k: int) -> float:
        w = np.exp(-((y - lattice) ** 2) / (2 * r * r))
        return math.exp(-((y - k) ** 2) / (2 * r * r)) / w.sum()

    ks = np.arange(-8, 9)
    law = np.array(
        [
            integrate.quad(
                lambda y, k=k: stats.norm.pdf(y, scale=inner) * kernel(y, k),
                k - 15 * inner,
                k + 15 * inner,
                limit=400,
                epsrel=1e-13,
            )[0]
            for k in ks
        ]
    )
    wide = np.arange(-200, 201)
    ref = np.exp(-(wide**2) / (2 * variance))
    ref = ref[200 + ks] / ref.sum()
    deviation = np.abs(np.log(law / ref)).max()
    assert deviation <= kernel_deviation(math.sqrt(variance), r)


def _exact_epsilon(sigma: float, shares: int, shift: int, q: float, steps: int) -> float:
    """Epsilon of the 1-D discrete mechanism itself: sum of ``shares`` ``N_Z(0, sigma^2)``,
    a record of integer sensitivity ``shift`` present with probability ``q``, ``steps`` times
    (dp-accounting's PLD of the two exact pmfs, both neighbouring directions)."""
    p = _sum_pmf(sigma, shares)
    without = np.concatenate([p, np.zeros(shift)])
    mixed = (1 - q) * without + q * np.concatenate([np.zeros(shift), p])
    keep = (without > 1e-280) & (mixed > 1e-280)
    keys = np.flatnonzero(keep)
    lower = {int(k): math.log(without[k]) for k in keys}
    upper = {int(k): math.log(mixed[k]) for k in keys}
    pld = privacy_loss_distribution.from_two_probability_mass_functions(lower, upper, symmetric=False)
    return pld.self_compose(steps).get_epsilon_for_delta(DELTA)


@pytest.mark.parametrize(
    "sigma,shares,shift,q,steps,slack",
    [
        (6, 3, 3, 0.2, 50, 0.08),  # small shares: the accountant's r^2 = 9 shows
        (20, 3, 10, 0.2, 50, 0.005),
        (4, 2, 2, 0.5, 20, 0.25),
    ],
)
def test_the_accountant_bounds_the_exact_discrete_mechanism(sigma, shares, shift, q, steps, slack) -> None:
    exact = _exact_epsilon(sigma, shares, shift, q, steps)
    ours = epsilon_spent([DdgSteps(DdgMechanism(sigma, shares, shift, 1), q, steps)], DELTA)
    assert exact <= ours <= exact * (1 + slack)


def _large(noise_multiplier: float, dim: int = 512) -> DdgMechanism:
    """Shares large enough that discreteness costs nothing in float64."""
    sensitivity = 3e5
    sigma = math.sqrt(((noise_multiplier * sensitivity) ** 2 + 9.0) / 4)
    return DdgMechanism(sigma, 4, sensitivity, dim)


def test_large_shares_cost_what_the_continuous_gaussian_costs() -> None:
    mech = _large(2.0)
    assert mech.kappa < 1e-70
    assert mech.noise_multiplier == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("z,q,steps", [(1.0, 0.25, 100), (3.0, 0.25, 300), (8.0, 0.05, 1000)])
def test_gaussian_limit_agrees_with_opacus(z, q, steps) -> None:
    from opacus.accountants import create_accountant

    ours = epsilon_spent([DdgSteps(_large(z), q, steps)], DELTA)
    prv, rdp = create_accountant("prv"), create_accountant("rdp")
    prv.history = rdp.history = [(z, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_prv, opacus_rdp = prv.get_epsilon(delta=DELTA), rdp.get_epsilon(delta=DELTA)
    assert abs(ours - opacus_prv) <= 0.015  # Opacus's PRV adds its error bound, 0.01
    assert ours < opacus_rdp  # RDP is a looser upper bound of the same mechanism


@pytest.mark.parametrize("z,steps", [(2.0, 1), (5.0, 10), (20.0, 100)])
def test_without_sampling_it_is_the_gaussian_closed_form(z, steps) -> None:
    """q = 1: ``steps`` Gaussian steps are one Gaussian with mu = sqrt(steps) / z, whose
    delta(epsilon) is Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang 2018)."""
    mu = math.sqrt(steps) / z

    def gap(eps: float) -> float:
        upper = stats.norm.cdf(-eps / mu + mu / 2)
        return upper - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - DELTA

    exact = optimize.brentq(gap, 0.0, 100.0, xtol=1e-12)
    ours = epsilon_spent([DdgSteps(_large(z), 1.0, steps)], DELTA)
    assert exact <= ours <= exact + 0.005


def test_composition_and_empty_histories() -> None:
    a, b = DdgSteps(_large(2.0), 0.25, 50), DdgSteps(_large(4.0), 0.1, 80)
    both = epsilon_spent([a, b], DELTA)
    assert both > max(epsilon_spent([a], DELTA), epsilon_spent([b], DELTA))
    assert epsilon_spent([], DELTA) == 0.0
    assert epsilon_spent([DdgSteps(_large(2.0), 0.25, 0)], DELTA) == 0.0
    with pytest.raises(DdpError, match="delta"):
        epsilon_spent([a], 0.0)


def test_a_mixed_history_costs_exactly_what_the_pld_accountant_says() -> None:
    """epsilon_spent builds each mechanism's PLD once per process and composes it; the result
    is the PLD accountant's on the same events, digit for digit, in any order of phases."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    stats, head = DdgSteps(_large(3.0), 0.25, 1), DdgSteps(_large(2.5), 0.25, 40)
    adapters = DdgSteps(_large(4.0), 0.1, 20)
    for history in ([stats, head], [stats, head, adapters], [adapters, stats, head, adapters]):
        events = [
            SelfComposedDpEvent(
                PoissonSampledDpEvent(h.sample_rate, GaussianDpEvent(h.mechanism.noise_multiplier)), h.steps
            )
            for h in history
        ]
        shift = math.fsum(h.steps * h.mechanism.kappa for h in history)
        direct = PLDAccountant().compose(ComposedDpEvent(events)).get_epsilon(DELTA * math.exp(-shift))
        assert epsilon_spent(history, DELTA) == direct + 2 * shift


def test_calibration_finds_the_smallest_noise() -> None:
    q, steps, target = 0.25, 20, 3.0
    z = calibrate_noise_multiplier(target, DELTA, q, steps)
    assert epsilon_spent([DdgSteps(_large(z), q, steps)], DELTA) <= target
    assert epsilon_spent([DdgSteps(_large(z - 0.01), q, steps)], DELTA) > target
    # after a history, the remaining steps need more noise for the same total
    earlier = [DdgSteps(_large(z), q, 5)]
    assert calibrate_noise_multiplier(target, DELTA, q, steps, earlier) > z


def test_unreachable_targets_and_degenerate_mechanisms_are_refused() -> None:
    spent = [DdgSteps(_large(1.0), 1.0, 50)]  # epsilon about 40 already
    with pytest.raises(DdpError, match="already spends"):
        calibrate_noise_multiplier(1.0, DELTA, 0.25, 10, spent)
    with pytest.raises(DdpError, match="almost no noise"):
        calibrate_noise_multiplier(1e4, DELTA, 0.25, 10)
    with pytest.raises(DdpError, match="r\\^2"):
        DdgMechanism(1.0, 4, 10.0, 8)  # 4 shares of scale 1 carry variance 4 < 9
    with pytest.raises(DdpError, match="honest_shares"):
        DdgMechanism(10.0, 0, 10.0, 8)
