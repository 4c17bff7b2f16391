"""Exact discrete Gaussian noise from a cryptographic random stream.

The sampler is Canonne, Kamath and Steinke's (2020, "The Discrete Gaussian for
Differential Privacy", arXiv 2004.00010, Algorithms 1-3), vectorised over a batch
the way TensorFlow Privacy's ``discrete_gaussian_utils`` does it:

* ``Bernoulli(exp(-n/d))`` for integers ``n >= 0``, ``d >= 1`` (their Algorithm 1):
  ``floor(n/d)`` draws of ``Bernoulli(exp(-1))`` that must all succeed, then the
  alternating-series trick for the fractional part (draw ``Bernoulli(g/k)`` for
  k = 1, 2, ... until one fails; succeed when k is odd). Every ``Bernoulli(a/b)``
  is an exact uniform integer below ``b`` compared with ``a``: no floating point
  anywhere, so the output law is exactly the discrete Gaussian's, given uniform
  random bits (floating-point samplers leak through their rounding; Mironov 2012).
* the discrete Laplace with integer scale ``t`` (their Algorithm 2 with s = 1);
* rejection (their Algorithm 3): ``Y ~ DLap(t)`` accepted with probability
  ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``, which is exactly ``N_Z(0, sigma^2)``
  for any ``t > 0``. With an integer ``sigma`` and ``t = sigma`` (TensorFlow
  Privacy's choice, at least 70% acceptance) the exponent is
  ``(|Y| - sigma)^2 / (2 sigma^2)``, a ratio of integers that fits int64 for
  ``sigma <= MAX_SIGMA`` and ``|Y| < 2^31``; larger ``|Y|`` (probability below
  ``exp(-100)`` a draw) is computed with Python integers, so the sampler stays exact.

Randomness: :class:`NoiseRandom` reads an AES-256-CTR keystream (pyca/cryptography)
keyed with 32 bytes from ``os.urandom``. A site's noise must be unpredictable to
the server even after it has seen earlier sums; numpy's generators (PCG64, Philox,
MT19937) are statistical generators whose state can be recovered from outputs, so
they are not used for noise. A fixed key makes the stream reproducible for the
known-answer tests; production code never passes one.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import DdpError

KEY_BYTES = 32
MAX_SIGMA = 1 << 24
"""Largest share scale: ``(|Y| - sigma)^2`` stays below 2^62 for every ``|Y| < 2^31``."""
_TWO_63 = np.uint64(1) << np.uint64(63)
_MAX_BELOW = 1 << 62
_SMALL = 1 << 31  # |Y| below this: the rejection exponent is computed in int64


class NoiseRandom:
    """A cryptographic stream of exact uniform integers (AES-256-CTR, zero nonce).

    Parameters
    ----------
    key : bytes, optional
        32-byte AES key. Omitted (production): fresh bytes from ``os.urandom``.
        Given: a reproducible stream, for tests only.

    Raises
    ------
    DdpError
        If ``key`` is not 32 bytes.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise DdpError(f"a noise key must be {KEY_BYTES} bytes; pass none to draw one from os.urandom")
        self._stream = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(16))).encryptor()

    def _bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words (``uint64``)."""
        return np.frombuffer(self._bytes(8 * n), dtype="<u8").astype(np.uint64)

    def below(self, high: np.ndarray) -> np.ndarray:
        """Uniform integers ``0 <= x < high``, elementwise and exact (rejection of 63-bit words).

        Parameters
        ----------
        high : numpy.ndarray
            Integer bounds in ``[1, 2^62]``.

        Returns
        -------
        numpy.ndarray
            ``int64`` array shaped like ``high``.
        """
        h = np.asarray(high, dtype=np.int64)
        if h.size and (h.min() < 1 or h.max() > _MAX_BELOW):
            raise DdpError(f"uniform bounds must lie in [1, 2^62], got [{h.min()}, {h.max()}]")
        flat = h.ravel().astype(np.uint64)
        out = np.empty(flat.shape, dtype=np.uint64)
        todo = np.arange(flat.size)
        while todo.size:
            bound = flat[todo]
            word = self.words(todo.size) >> np.uint64(1)
            ok = word < (_TWO_63 // bound) * bound  # the largest multiple of bound <= 2^63
            out[todo[ok]] = word[ok] % bound[ok]
            todo = todo[~ok]
        return out.astype(np.int64).reshape(h.shape)

    def bits(self, n: int) -> np.ndarray:
        """``n`` fair coin flips (``bool``)."""
        raw = np.frombuffer(self._bytes((n + 7) // 8), dtype=np.uint8)
        return np.unpackbits(raw)[:n].astype(bool)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` uniform floats in ``[0, 1)`` on the 2^-53 grid (``float64``)."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _bernoulli_exp_fraction(num: np.ndarray, den: np.ndarray, rng: NoiseRandom) -> np.ndarray:
    """``Bernoulli(exp(-num/den))`` for ``0 <= num <= den`` (CKS Algorithm 1, gamma <= 1)."""
    k = np.ones(num.shape, dtype=np.int64)
    active = np.arange(num.size)
    while active.size:
        success = rng.below(den[active] * k[active]) < num[active]
        active = active[success]
        k[active] += 1
    return k % 2 == 1


def _bernoulli_exp_one(n: int, rng: NoiseRandom) -> np.ndarray:
    """``n`` draws of ``Bernoulli(exp(-1))``."""
    ones = np.ones(n, dtype=np.int64)
    return _bernoulli_exp_fraction(ones, ones, rng)


def bernoulli_exp(whole: np.ndarray, num: np.ndarray, den: np.ndarray, rng: NoiseRandom) -> np.ndarray:
    """``Bernoulli(exp(-(whole + num/den)))``, exactly, elementwise.

    Parameters
    ----------
    whole : numpy.ndarray
        Integer part of the exponent (``int64``, or ``object`` holding Python
        integers beyond int64), ``>= 0``.
    num, den : numpy.ndarray
        Fractional part ``num/den`` with ``0 <= num < den`` (``int64``,
        ``den * (number of draws) <= 2^62``).
    rng : NoiseRandom
        The random stream.

    Returns
    -------
    numpy.ndarray
        ``bool`` array.
    """
    result = _bernoulli_exp_fraction(num, den, rng)
    remaining = whole.copy()
    alive = np.flatnonzero(result & (remaining > 0))
    while alive.size:
        success = _bernoulli_exp_one(alive.size, rng)
        result[alive[~success]] = False
        alive = alive[success]
        remaining[alive] -= 1
        alive = alive[remaining[alive] > 0]
    return result


def sample_discrete_laplace(t: int, size: int, rng: NoiseRandom) -> np.ndarray:
    """``size`` draws of the discrete Laplace ``P(y) ∝ exp(-|y|/t)`` (CKS Algorithm 2, s = 1).

    Parameters
    ----------
    t : int
        Scale, ``1 <= t <= MAX_SIGMA``.
    size : int
        Number of draws.
    rng : NoiseRandom
        The random stream.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of length ``size``.
    """
    out: list[np.ndarray] = []
    need = size
    while need > 0:
        batch = 2 * need + 16  # P(accept) >= (1 - e^-1) / 2 per trial
        u = rng.below(np.full(batch, t, dtype=np.int64))
        zeros = np.zeros(batch, dtype=np.int64)
        u = u[bernoulli_exp(zeros, u, np.full(batch, t, dtype=np.int64), rng)]
        v = np.zeros(u.size, dtype=np.int64)
        alive = np.arange(u.size)
        while alive.size:  # v = successes of Bernoulli(exp(-1)) before the first failure
            alive = alive[_bernoulli_exp_one(alive.size, rng)]
            v[alive] += 1
        x = u + t * v
        negative = rng.bits(x.size)
        keep = ~(negative & (x == 0))  # otherwise 0 would be drawn twice as often
        y = np.where(negative, -x, x)[keep]
        out.append(y[:need])
        need -= out[-1].size
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _accept(y: np.ndarray, sigma: int, rng: NoiseRandom) -> np.ndarray:
    """CKS Algorithm 3's test, ``t = sigma``: ``Bernoulli(exp(-(|y| - sigma)^2 / (2 sigma^2)))``."""
    den = 2 * sigma * sigma
    a = np.abs(y) - sigma
    small = np.abs(a) < _SMALL
    whole = np.zeros(y.shape, dtype=np.int64)
    frac = np.zeros(y.shape, dtype=np.int64)
    whole[small], frac[small] = np.divmod(a[small] * a[small], den)
    if not small.all():  # a draw of probability below exp(-100): exact in Python integers
        whole = whole.astype(object)
        for i in np.flatnonzero(~small):
            whole[i], frac[i] = divmod(int(a[i]) ** 2, den)
    return bernoulli_exp(whole, frac, np.full(y.shape, den, dtype=np.int64), rng)


def sample_discrete_gaussian(sigma: int, size: int, rng: NoiseRandom) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma^2)``.

    ``P(x) ∝ exp(-x^2 / (2 sigma^2))`` on the integers: mean 0, variance at most
    ``sigma^2`` (equal to it within a relative ``1e-7`` for ``sigma >= 1``), and
    ``sigma``-subgaussian (CKS Proposition 19 and Corollary 9).

    Parameters
    ----------
    sigma : int
        Scale, an integer in ``[1, MAX_SIGMA]``.
    size : int
        Number of draws (``>= 0``).
    rng : NoiseRandom
        The random stream (fresh ``NoiseRandom()`` in production).

    Returns
    -------
    numpy.ndarray
        ``int64`` array of length ``size``.

    Raises
    ------
    DdpError
        If ``sigma`` is not an integer in range or ``size`` is negative.
    """
    integral = isinstance(sigma, (int, np.integer)) and not isinstance(sigma, bool)
    if not integral or not 1 <= sigma <= MAX_SIGMA:
        raise DdpError(f"the discrete Gaussian's scale must be an integer in [1, {MAX_SIGMA}], got {sigma!r}")
    if size < 0:
        raise DdpError(f"cannot draw {size} samples")
    sigma = int(sigma)
    out: list[np.ndarray] = []
    need = size
    while need > 0:
        y = sample_discrete_laplace(sigma, math.ceil(1.5 * need) + 16, rng)
        kept = y[_accept(y, sigma, rng)]
        out.append(kept[:need])
        need -= out[-1].size
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


__all__ = [
    "KEY_BYTES",
    "MAX_SIGMA",
    "NoiseRandom",
    "bernoulli_exp",
    "sample_discrete_gaussian",
    "sample_discrete_laplace",
]
