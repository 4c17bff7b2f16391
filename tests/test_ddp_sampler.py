"""The exact discrete Gaussian sampler and its cryptographic random stream.

Known answers pin the output for a fixed key, so any change to the algorithm or
to how it consumes randomness fails. The statistical tests use fixed keys (they
cannot flake) with tolerances a correct sampler meets for all but a 1e-6
fraction of keys: 5 standard errors for means and variances (exact moments from
the pmf), and the chi-square 1 - 1e-6 quantile for the pmf.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedseal.common.ddp import DdpError, NoiseRandom, sample_discrete_gaussian
from fedseal.common.ddp.sampler import MAX_SIGMA, _accept, bernoulli_exp, sample_discrete_laplace

KEY = bytes(range(32))


def _key(tag: int) -> bytes:
    return bytes([tag]) * 32


def test_the_stream_is_aes_256_ctr() -> None:
    """AES-256 of the all-zero block under the all-zero key (the standard known answer)."""
    assert NoiseRandom(bytes(32))._bytes(16).hex() == "dc95c078a2408989ad48a21492842087"


def test_known_answers() -> None:
    assert sample_discrete_gaussian(3, 12, NoiseRandom(KEY)).tolist() == KNOWN_SIGMA_3
    assert sample_discrete_gaussian(100_000, 4, NoiseRandom(KEY)).tolist() == KNOWN_SIGMA_1E5
    assert NoiseRandom(KEY).below(np.array([6, 7, 1 << 40, 1])).tolist() == KNOWN_BELOW


KNOWN_SIGMA_3 = [0, -2, -1, 0, -6, 1, 2, -1, -3, 3, 0, 0]
KNOWN_SIGMA_1E5 = [-159091, -15335, 36649, 60256]
KNOWN_BELOW = [3, 2, 710133100280, 0]


def test_a_fresh_stream_differs_each_time() -> None:
    assert not np.array_equal(
        sample_discrete_gaussian(1000, 64, NoiseRandom()), sample_discrete_gaussian(1000, 64, NoiseRandom())
    )


@pytest.mark.parametrize("bad", [b"short", 32, "x" * 32])
def test_a_key_must_be_32_bytes(bad) -> None:
    with pytest.raises(DdpError, match="32 bytes"):
        NoiseRandom(bad)


@pytest.mark.parametrize("sigma", [0, -1, 2.5, True, MAX_SIGMA + 1])
def test_scale_must_be_an_integer_in_range(sigma) -> None:
    with pytest.raises(DdpError, match="scale"):
        sample_discrete_gaussian(sigma, 4, NoiseRandom(KEY))


def test_uniform_integers_are_uniform_and_bounded() -> None:
    rng = NoiseRandom(_key(1))
    draws = rng.below(np.full(60_000, 6))
    assert draws.min() == 0 and draws.max() == 5
    chi2 = stats.chisquare(np.bincount(draws, minlength=6)).statistic
    assert chi2 < stats.chi2.isf(1e-6, 5)
    with pytest.raises(DdpError, match="bounds"):
        rng.below(np.array([0]))
    with pytest.raises(DdpError, match="bounds"):
        rng.below(np.array([(1 << 62) + 1]))


@pytest.mark.parametrize("num,den,whole", [(1, 3, 0), (2, 2, 0), (0, 5, 1), (3, 7, 2)])
def test_bernoulli_exp_has_the_exact_probability(num, den, whole) -> None:
    n = 40_000
    ones = np.ones(n, dtype=np.int64)
    hits = bernoulli_exp(whole * ones, num * ones, den * ones, NoiseRandom(_key(2))).sum()
    p = math.exp(-(whole + num / den))
    assert abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def test_rejection_is_exact_beyond_int64() -> None:
    """|y| - sigma beyond 2^31 takes the Python-integer path; a centred draw is always kept."""
    kept = _accept(np.array([10**15, 3, -3]), 3, NoiseRandom(KEY))
    assert kept.tolist() == [False, True, True]


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """``N_Z(0, sigma^2)`` on ``support`` (normalised over a support wide enough for float64)."""
    wide = np.arange(-int(60 * sigma) - 5, int(60 * sigma) + 6)
    norm = np.exp(-(wide.astype(float) ** 2) / (2 * sigma**2)).sum()
    return np.exp(-(support.astype(float) ** 2) / (2 * sigma**2)) / norm


def _chi_square(draws: np.ndarray, pmf) -> tuple[float, int]:
    """Chi-square of ``draws`` against ``pmf`` on bins with expected count >= 20 (tails merged)."""
    n = draws.size
    half = 1
    while n * pmf(np.array([half + 1]))[0] >= 20:
        half += 1
    support = np.arange(-half, half + 1)
    expected = n * pmf(support)
    observed = np.array([np.count_nonzero(draws == k) for k in support], dtype=float)
    tail_exp = (n - expected.sum()) / 2
    tails = [np.count_nonzero(draws < -half), np.count_nonzero(draws > half)]
    observed = np.append(observed, tails)
    expected = np.append(expected, [tail_exp, tail_exp])
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


@pytest.mark.parametrize("sigma,tag", [(1, 3), (4, 4), (30, 5)])
def test_moments_and_pmf_match_the_discrete_gaussian(sigma, tag) -> None:
    n = 200_000
    draws = sample_discrete_gaussian(sigma, n, NoiseRandom(_key(tag)))
    assert draws.dtype == np.int64 and draws.shape == (n,)
    wide = np.arange(-int(60 * sigma) - 5, int(60 * sigma) + 6)
    p = _pmf(sigma, wide)
    var = float((p * wide**2.0).sum())
    fourth = float((p * wide**4.0).sum())
    assert var == pytest.approx(sigma**2, rel=1e-6)  # exact variance of N_Z(0, s^2), s >= 1
    assert abs(draws.mean()) <= 5 * math.sqrt(var / n)
    assert abs(draws.astype(float).var() - var) <= 5 * math.sqrt((fourth - var**2) / n)
    chi2, dof = _chi_square(draws, lambda k: _pmf(sigma, k))
    assert chi2 < stats.chi2.isf(1e-6, dof)


def test_discrete_laplace_matches_its_pmf() -> None:
    t, n = 3, 100_000
    draws = sample_discrete_laplace(t, n, NoiseRandom(_key(6)))
    ratio = math.exp(-1 / t)

    def pmf(k: np.ndarray) -> np.ndarray:
        return (1 - ratio) / (1 + ratio) * ratio ** np.abs(k)

    chi2, dof = _chi_square(draws, pmf)
    assert chi2 < stats.chi2.isf(1e-6, dof)


def test_the_chi_square_test_can_fail() -> None:
    """The same test rejects draws of a slightly different scale (power check)."""
    draws = sample_discrete_gaussian(4, 200_000, NoiseRandom(_key(4)))
    chi2, dof = _chi_square(draws, lambda k: _pmf(4.1, k))
    assert chi2 > stats.chi2.isf(1e-6, dof)
