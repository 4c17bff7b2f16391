"""Record-level (epsilon, delta) of the Poisson-sampled distributed discrete Gaussian sum.

One step: every record of the federation is in the step's sample with
probability ``q`` (Poisson), the sites' shares are summed, and a record's site
relies on at least ``h`` honest shares, each ``N_Z(0, s^2)`` in each of ``d``
coordinates; one record moves the rounded sum by an integer vector of L2 norm at
most ``D2`` (:mod:`fedseal.common.ddp.encoding`).

**The reduction.** The step is, up to a pointwise likelihood ratio of at most
``exp(kappa)``, a *post-processing of the continuous Gaussian mechanism* with
standard deviation ``sigma_c = sqrt(h s^2 - r^2)`` and sensitivity ``D2``, for a
fixed ``r`` (:data:`KERNEL_SCALE`). Two facts from Poisson summation, with
``omega(x) = sum_{m >= 1} exp(-2 pi^2 x^2 m^2)``:

A. *The sum of shares.* The law of a sum of ``h`` independent ``N_Z(0, s^2)`` is
   within a factor ``exp(±2 theta_h)`` of ``N_Z(0, h s^2)`` at every integer, with
   ``theta_h = -sum_{j=1}^{h-1} log(1 - 2 omega(s sqrt(j/(j+1))))``. (Induction on
   ``j``: completing the square in the convolution of ``N_Z(0, j s^2)`` with
   ``N_Z(0, s^2)`` leaves a Gaussian sum over the integers of scale
   ``s sqrt(j/(j+1))``, which is ``sqrt(2 pi) s sqrt(j/(j+1))`` times ``1 ± 2 omega``.
   The same exponents make Kairouz, Liu and Steinke's ``tau``, arXiv 2102.06387.)
B. *A discrete Gaussian is a noisy rounding of a continuous one.* Let ``K(y)`` be
   ``N_Z(y, r^2)``, the discrete Gaussian centred at ``y``. It commutes with
   integer shifts, and for ``G ~ N(0, S^2 - r^2)`` the law of ``K(G)`` is within
   ``exp(±theta')`` of ``N_Z(0, S^2)`` at every integer, with
   ``theta' = -log(1 - 2 omega(r)) - log(1 - 2 omega(S))`` (the normaliser
   ``sum_j phi_r(y - j)`` of ``K`` is ``1 ± 2 omega(r)`` for every ``y``, and
   ``phi_{sqrt(S^2 - r^2)} * phi_r = phi_S``).

So for an integer data vector ``x``, ``x + (sum of honest shares)`` is within
``exp(±kappa)``, ``kappa = d (2 theta_h + theta')``, of ``K(x + G)`` coordinatewise,
``G ~ N(0, sigma_c^2 I)``: a post-processing (by ``K``, which knows no data) of the
Gaussian mechanism. The same holds for the Poisson-sampled mixtures (bounded
ratios survive mixing) and, step by step, for the whole adaptive run: the
transcript's likelihood ratio to the Gaussian run's stays within
``exp(±T kappa)`` on either dataset, so::

    epsilon(delta) <= epsilon_Gauss(delta exp(-T kappa)) + 2 T kappa,

where ``epsilon_Gauss`` is the Poisson-subsampled Gaussian's with noise multiplier
``sigma_c / D2`` at rate ``q`` (mixtures of shifts of norm at most ``D2`` are
dominated by the shift ``D2``, as in DP-SGD). ``epsilon_Gauss`` comes from
dp-accounting's PLD accountant (Google; pessimistic discretisation, an upper
bound). For shares of scale ``s >= 5``, ``kappa`` is about ``d * 1.4e-77`` (the
kernel's ``omega(3)``; the shares' own terms are below ``1e-100``), under ``1e-70``
for any ``d`` below ``2^20``, and the discrete mechanism costs what the continuous
one does to every digit a float holds. Extra honest shares, and the shares of colluding sites
(known to the server), are independent of the record: post-processing.

Why not Kairouz et al.'s route (their Proposition 14 RDP bound for the sum with
Zhu and Wang's general Poisson-subsampling theorem)? That theorem's factor 3
(needed for mechanisms other than the Gaussian) cost a factor of four in epsilon:
at ``q = 1/4``, 300 steps, noise multiplier 8, it gives epsilon 10.1 against
the Gaussian's 2.4 at delta 1e-5 (docs/ddp.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from dp_accounting import (
    ComposedDpEvent,
    ExplicitBracketInterval,
    GaussianDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
    calibrate_dp_mechanism,
)
from dp_accounting.pld import privacy_loss_distribution as PLD
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation as NeighborRel

from .errors import DdpError

PLD_INTERVAL = 1e-4
"""The PLD's value discretisation interval (PLDAccountant's default)."""
KERNEL_SCALE = 3.0
"""``r`` of fact B: costs ``r^2 = 9`` of the honest variance (ring units, where it is
at least ``10^4`` in any usable encoding) and contributes ``omega(3) < 1e-77`` to ``kappa``."""
MIN_NOISE_MULTIPLIER = 0.3
"""Calibration does not go below this noise multiplier (see :func:`calibrate_noise_multiplier`)."""
_OMEGA_TERMS = 64


def omega(x: float) -> float:
    """``sum_{m >= 1} exp(-2 pi^2 x^2 m^2)``: the relative error of a Gaussian sum over
    the integers at scale ``x`` (Poisson summation)."""
    return math.fsum(math.exp(-2.0 * math.pi**2 * x * x * m * m) for m in range(1, _OMEGA_TERMS + 1))


def _log_one_minus_two_omega(x: float) -> float:
    w = omega(x)
    if not w < 0.5:
        raise DdpError(
            f"a discrete Gaussian of scale {x:.3g} is too narrow for the reduction "
            "to the continuous Gaussian; use larger shares"
        )
    return math.log1p(-2.0 * w)


def sum_deviation(share_sigma: float, honest: int) -> float:
    """``theta_h`` of fact A: the sum of ``honest`` shares is within ``exp(±2 theta_h)``
    of ``N_Z(0, honest * share_sigma^2)`` at every integer."""
    return -math.fsum(
        _log_one_minus_two_omega(share_sigma * math.sqrt(j / (j + 1))) for j in range(1, honest)
    )


def kernel_deviation(total_sigma: float, r: float = KERNEL_SCALE) -> float:
    """``theta'`` of fact B: ``K(N(0, total_sigma^2 - r^2))`` is within ``exp(±theta')`` of
    ``N_Z(0, total_sigma^2)`` at every integer."""
    return -_log_one_minus_two_omega(r) - _log_one_minus_two_omega(total_sigma)


@dataclass(frozen=True)
class DdgMechanism:
    """One step's noisy sum, in ring units: what a site's ledger records for it.

    Attributes
    ----------
    share_sigma : float
        Scale ``s`` of each honest site's discrete Gaussian share.
    honest_shares : int
        Fewest honest shares ``h`` in the sum (the site's own included).
    l2_sensitivity : float
        Most that one record moves the rounded sum in L2 (``D2``).
    dim : int
        Number of noisy coordinates ``d``.
    """

    share_sigma: float
    honest_shares: int
    l2_sensitivity: float
    dim: int

    def __post_init__(self) -> None:
        if self.honest_shares < 1 or self.dim < 1:
            raise DdpError(f"honest_shares and dim must be positive, got {self.honest_shares} and {self.dim}")
        if not (math.isfinite(self.l2_sensitivity) and self.l2_sensitivity > 0):
            raise DdpError(f"l2_sensitivity must be positive, got {self.l2_sensitivity!r}")
        if not (
            math.isfinite(self.share_sigma) and self.honest_shares * self.share_sigma**2 > KERNEL_SCALE**2
        ):
            raise DdpError(
                f"{self.honest_shares} shares of scale {self.share_sigma!r} carry "
                f"less variance than the reduction's r^2 = {KERNEL_SCALE**2:g}"
            )

    @property
    def gaussian_sigma(self) -> float:
        """``sigma_c = sqrt(h s^2 - r^2)``: the continuous Gaussian this step post-processes."""
        return math.sqrt(self.honest_shares * self.share_sigma**2 - KERNEL_SCALE**2)

    @property
    def noise_multiplier(self) -> float:
        """``sigma_c / D2``: the noise multiplier to account the step with."""
        return self.gaussian_sigma / self.l2_sensitivity

    @property
    def kappa(self) -> float:
        """Bound on the step's log likelihood ratio to the Gaussian post-processing."""
        total = math.sqrt(self.honest_shares) * self.share_sigma
        return self.dim * (
            2.0 * sum_deviation(self.share_sigma, self.honest_shares) + kernel_deviation(total)
        )


@dataclass(frozen=True)
class DdgSteps:
    """``steps`` steps of one mechanism at Poisson sampling rate ``sample_rate``."""

    mechanism: DdgMechanism
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise DdpError(f"sample_rate must lie in [0, 1], got {self.sample_rate!r}")
        if self.steps < 0:
            raise DdpError(f"steps must be >= 0, got {self.steps}")


def _gaussian_steps(noise_multiplier: float, sample_rate: float, steps: int) -> SelfComposedDpEvent:
    return SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier)), steps)


def _taken(history: Sequence[DdgSteps]) -> list[DdgSteps]:
    """The entries of ``history`` that cost anything: at least one step at a positive rate."""
    return [h for h in history if h.steps and h.sample_rate > 0]


def _shift(taken: Sequence[DdgSteps]) -> float:
    """``T kappa`` over ``taken``: the discrete mechanism's distance from the Gaussian's."""
    return math.fsum(h.steps * h.mechanism.kappa for h in taken)


def _events(history: Sequence[DdgSteps]) -> list[SelfComposedDpEvent]:
    return [_gaussian_steps(h.mechanism.noise_multiplier, h.sample_rate, h.steps) for h in _taken(history)]


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise DdpError(f"delta must lie in (0, 1), got {delta!r}")


def epsilon_spent(history: Sequence[DdgSteps], delta: float) -> float:
    """Record-level epsilon at ``delta`` after every step of ``history`` (0 for none).

    Parameters
    ----------
    history : Sequence[DdgSteps]
        The steps a record's site took part in, with their real mechanisms.
    delta : float
        Target delta in ``(0, 1)``.

    Returns
    -------
    float
        ``epsilon_Gauss(delta exp(-T kappa)) + 2 T kappa`` (see the module docstring).
    """
    _check_delta(delta)
    steps = _taken(history)
    if not steps:
        return 0.0
    shift = _shift(steps)
    # What PLDAccountant().compose(ComposedDpEvent(_events(history))) computes, with each
    # mechanism's PLD built once per process (a second each) instead of once per call.
    pld = PLD.identity(value_discretization_interval=PLD_INTERVAL)
    for h in steps:
        pld = pld.compose(
            _sampled_gaussian(h.mechanism.noise_multiplier, h.sample_rate).self_compose(h.steps)
        )
    return float(pld.get_epsilon_for_delta(delta * math.exp(-shift))) + 2.0 * shift


@lru_cache(maxsize=8)  # a run has a few mechanisms; each PLD holds up to a few MB
def _sampled_gaussian(noise_multiplier: float, sample_rate: float) -> PLD.PrivacyLossDistribution:
    """The PLD of one step of the Poisson-subsampled Gaussian, as PLDAccountant builds it."""
    return PLD.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=PLD_INTERVAL,
        sampling_prob=sample_rate,
        neighboring_relation=NeighborRel.ADD_OR_REMOVE_ONE,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    history: Sequence[DdgSteps] = (),
    tolerance: float = 1e-3,
) -> float:
    """Smallest Gaussian noise multiplier (within ``tolerance``) whose ``steps`` more steps,
    after ``history``, keep epsilon at most ``target_epsilon``.

    An encoding planned with it has ``DdgMechanism.noise_multiplier`` at least this
    (share scales round up), so only ``kappa`` (under 1e-70 for shares of scale 5
    and more) separates its epsilon from the target; the site checks the real
    mechanism with :func:`epsilon_spent` before it sends.

    Raises
    ------
    DdpError
        If the inputs are out of range, ``history`` alone already spends the target,
        or the noise multiplier would lie outside ``[MIN_NOISE_MULTIPLIER, 10^6]``.
    """
    _check_delta(delta)
    if not (target_epsilon > 0 and steps >= 1 and 0.0 < sample_rate <= 1.0):
        raise DdpError(
            f"need a positive target epsilon, at least one step and a sampling "
            f"rate in (0, 1], got {target_epsilon}, {steps} and {sample_rate}"
        )
    already = epsilon_spent(history, delta)
    if already >= target_epsilon:
        raise DdpError(
            f"the history already spends epsilon {already:.4g}, not below the target "
            f"{target_epsilon}: no noise multiplier reaches it"
        )
    before = _events(history)
    shift = _shift(_taken(history))
    target, at_delta = target_epsilon - 2.0 * shift, delta * math.exp(-shift)

    def event(z: float) -> ComposedDpEvent:
        return ComposedDpEvent([*before, _gaussian_steps(z, sample_rate, steps)])

    def spent(z: float) -> float:
        return PLDAccountant().compose(event(z)).get_epsilon(at_delta)

    # Bracket from z = 1 by doubling and halving; the PLD of a multiplier below
    # MIN_NOISE_MULTIPLIER takes minutes, and no useful run needs one.
    low, high = 1.0, 1.0
    while spent(high) > target:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise DdpError(
                f"epsilon {target_epsilon} at delta {delta} needs a noise multiplier "
                f"above 10^6 over {steps} steps at sampling rate {sample_rate}"
            )
    while low == high or spent(low) <= target:
        low, high = low / 2.0, low
        if low < MIN_NOISE_MULTIPLIER:
            raise DdpError(
                f"epsilon {target_epsilon} is reached with a noise multiplier below "
                f"{MIN_NOISE_MULTIPLIER}, almost no noise; lower the target"
            )
    z = calibrate_dp_mechanism(
        PLDAccountant,
        event,
        target,
        at_delta,
        bracket_interval=ExplicitBracketInterval(low, high),
        tol=tolerance,
    )
    return float(z)


__all__ = [
    "DdgMechanism",
    "DdgSteps",
    "KERNEL_SCALE",
    "calibrate_noise_multiplier",
    "epsilon_spent",
    "kernel_deviation",
    "omega",
    "sum_deviation",
]
