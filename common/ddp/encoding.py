"""How a site's clipped sum becomes a noisy share in Z_2^32, and how the server reads the sum.

Following Kairouz, Liu and Steinke (2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", arXiv 2102.06387,
Algorithm 1) and TensorFlow Federated's ``ddp_secure_aggregator``, with the unit
of privacy a *record* at a site, not a site:

1. **Bound** the site's clipped sum ``S`` (the sum of its sampled records' clipped
   gradients or statistics rows, each of L2 norm at most ``clip``) to L2 norm
   ``sum_bound`` by projection. Projection onto a ball is 1-Lipschitz, so one
   record still moves the bounded sum by at most ``clip``, and the ring's load is
   bounded whatever the site's sample size.
2. **Flatten**: pad to ``d = 2^k`` and apply the randomised Hadamard transform
   ``x = scale * H D S`` (``D`` random signs from the round's public seed, ``H``
   the orthonormal Walsh-Hadamard matrix). Rotation keeps L2 norms and spreads a
   vector's mass over all coordinates (Hoeffding: every coordinate is at most
   ``|S| sqrt(2 ln(4d/beta)/d)`` with probability ``1 - beta/2``), so a few large
   coordinates cannot wrap the ring.
3. **Round** each coordinate randomly, ``floor(x + U)`` with ``U`` uniform: unbiased.
   Conditional rounding (re-round until the rounded vector's norm is small), the
   device of Kairouz et al. for *client*-level privacy, bounds the norm of one
   rounded vector, which is a client's sensitivity there. Here a record's
   sensitivity is the difference of two rounded sums, and conditioning would
   break the coupling that bounds it. Instead: with the same ``U`` on both
   sides, ``floor(x + U) - floor(x' + U)`` differs from ``x - x'`` by less than 1
   in every coordinate, so a record moves the rounded share by an integer vector
   of L2 norm below ``l2_sensitivity = scale * clip + sqrt(d)``, whatever ``U``
   is: the output is a mixture over ``U`` of mechanisms each dominated by that
   shift, and the accountant uses it (:mod:`fedseal.common.ddp.accounting`).
4. **Noise**: add the site's share, ``share_sigma``-scaled discrete Gaussian noise in
   every coordinate (:mod:`fedseal.common.ddp.sampler`).
5. **Wrap** into Z_2^32 (two's complement), the ring SecAgg+ masks and sums in.

The server decodes the unmasked sum: read it as signed 32-bit integers, check
that it lies within what honest sites produce, divide by ``scale``, undo the
rotation and drop the padding.

**No wrap-around.** :func:`plan_encoding` picks the largest ``scale`` for which the
sum of ``n`` honest shares stays inside ``[-2^31, 2^31 - 1]`` in every coordinate
with probability at least ``1 - wrap_probability`` (``beta``):

    scale * n * sum_bound * sqrt(2 ln(4d/beta) / d)     (data, Hoeffding over the signs)
  + sqrt(n) * share_sigma * sqrt(2 ln(4d/beta))         (noise: N_Z(0, s^2) is s-subgaussian)
  + n                                                   (rounding, each error below 1)
  <= 2^31 - 1,

each probabilistic term failing with probability at most ``beta/2`` over all
``d`` coordinates. :func:`decode_sum` raises :class:`SumRangeError` on a sum
beyond that bound: with honest sites that happens with probability at most
``beta``; otherwise some site sent a share the protocol cannot produce.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .accounting import KERNEL_SCALE
from .errors import DdpError, SumRangeError
from .sampler import KEY_BYTES, MAX_SIGMA, NoiseRandom, sample_discrete_gaussian

RING_BITS = 32
RING_MAX = (1 << (RING_BITS - 1)) - 1
"""Largest signed value of the ring's two's-complement reading."""
MAX_INFLATION = 1.01
"""Most rounding may add to a record's sensitivity: ``(scale*clip + sqrt(d)) / (scale*clip)``."""
DEFAULT_WRAP_PROBABILITY = 2.0**-40
_ROTATION_DOMAIN = b"fedseal ddp rotation v1\x00"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def padded_dim(dim: int) -> int:
    """The smallest power of two ``>= dim`` (the Hadamard transform's length)."""
    return 1 << max(0, (dim - 1).bit_length())


def _tail_factor(d: int, beta: float) -> float:
    """``sqrt(2 ln(4d / beta))``: each of ``d`` subgaussian coordinates stays below it
    (in units of its scale) with probability ``1 - beta/2`` in all."""
    return math.sqrt(2.0 * math.log(4.0 * d / beta))


@dataclass(frozen=True)
class Encoding:
    """The public parameters of one round's encoding, the same at every site and the server.

    Attributes
    ----------
    dim : int
        Length of a site's real vector.
    clip : float
        L2 bound on one record's contribution (real units).
    sum_bound : float
        A site's clipped sum is projected onto the L2 ball of this radius.
    scale : float
        Ring units per real unit (``gamma``).
    share_sigma : int
        Scale of each site's discrete Gaussian share (ring units); 0 means no
        noise (the non-private arm).
    max_sites : int
        Most shares the ring sum may hold (the round's cohort).
    wrap_probability : float
        Bound on the chance that an honest sum wraps or fails :func:`decode_sum`'s check.
    padded_dim : int
        ``dim`` padded to a power of two: the length of every share.
    l2_sensitivity : float
        Most that one record moves a share in L2 (ring units): ``scale*clip + sqrt(padded_dim)``.

    Raises
    ------
    DdpError
        If a parameter is out of range.
    """

    dim: int
    clip: float
    sum_bound: float
    scale: float
    share_sigma: int
    max_sites: int
    wrap_probability: float = DEFAULT_WRAP_PROBABILITY
    padded_dim: int = field(init=False)
    l2_sensitivity: float = field(init=False)

    def __post_init__(self) -> None:
        if not _is_int(self.dim) or self.dim < 1:
            raise DdpError(f"dim must be a positive integer, got {self.dim!r}")
        for name in ("clip", "sum_bound", "scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
                raise DdpError(f"{name} must be positive and finite, got {value!r}")
        if not _is_int(self.share_sigma) or not 0 <= self.share_sigma <= MAX_SIGMA:
            raise DdpError(f"share_sigma must be an integer in [0, {MAX_SIGMA}], got {self.share_sigma!r}")
        if not _is_int(self.max_sites) or self.max_sites < 1:
            raise DdpError(f"max_sites must be a positive integer, got {self.max_sites!r}")
        if not 0.0 < self.wrap_probability < 1.0:
            raise DdpError(f"wrap_probability must lie in (0, 1), got {self.wrap_probability!r}")
        d = padded_dim(int(self.dim))
        l2 = self.scale * self.clip + math.sqrt(d)
        object.__setattr__(self, "padded_dim", d)
        object.__setattr__(self, "l2_sensitivity", l2)
        if self.ring_bound(int(self.max_sites)) > RING_MAX:
            raise DdpError(
                f"the sum of {self.max_sites} shares can reach "
                f"{self.ring_bound(self.max_sites):.3g}, beyond the ring's {RING_MAX}: lower scale "
                "or share_sigma (plan_encoding picks a scale that fits)"
            )

    def norm_bound(self, sites: int) -> float:
        """Largest L2 norm of an honest sum of ``sites`` shares, on the same event as
        :meth:`ring_bound`: the data part is at most ``scale * sites * sum_bound`` exactly
        (the rotation keeps norms), the noise at most its coordinate bound in each of the
        ``padded_dim`` coordinates, the rounding below 1 per site and coordinate.

        Much tighter than :meth:`ring_bound` times ``sqrt(padded_dim)`` for the data part
        (by the Hoeffding factor), so :func:`decode_sum` checks both: a share far
        beyond the protocol's range is refused even when the planned cohort fills the ring.
        """
        k = _tail_factor(self.padded_dim, self.wrap_probability)
        root_d = math.sqrt(self.padded_dim)
        return (
            self.scale * sites * self.sum_bound + (math.sqrt(sites) * self.share_sigma * k + sites) * root_d
        )

    def ring_bound(self, sites: int) -> float:
        """Largest coordinate of an honest sum of ``sites`` shares, except with
        probability ``wrap_probability`` (see the module docstring)."""
        k = _tail_factor(self.padded_dim, self.wrap_probability)
        data = self.scale * sites * self.sum_bound * k / math.sqrt(self.padded_dim)
        return data + math.sqrt(sites) * self.share_sigma * k + sites


def required_share_sigma(noise_multiplier: float, l2_sensitivity: float, honest: int) -> int:
    """Smallest integer share scale ``s`` with ``sqrt(honest s^2 - r^2) >= noise_multiplier *
    l2_sensitivity``: ``honest`` such shares are accounted as that much Gaussian noise
    (:mod:`fedseal.common.ddp.accounting`; :mod:`fedseal.common.ddp.shares` says why
    ``honest`` shares)."""
    return math.ceil(math.sqrt(((noise_multiplier * l2_sensitivity) ** 2 + KERNEL_SCALE**2) / honest))


def plan_encoding(
    *,
    dim: int,
    clip: float,
    sum_bound: float,
    max_sites: int,
    noise_multiplier: float,
    honest_shares: int,
    wrap_probability: float = DEFAULT_WRAP_PROBABILITY,
) -> Encoding:
    """The finest encoding whose honest sums do not wrap, with the noise the target asks for.

    ``share_sigma = required_share_sigma(noise_multiplier, l2_sensitivity, honest_shares)``,
    about ``noise_multiplier * l2_sensitivity / sqrt(honest_shares)``: the shares of
    ``honest_shares`` honest sites add up to ``noise_multiplier`` times a record's
    sensitivity (see :mod:`fedseal.common.ddp.shares`). ``scale`` is the largest for
    which the ring bound holds with ``max_sites`` shares (linear in ``scale``,
    solved in closed form).

    Parameters
    ----------
    dim, clip, sum_bound, max_sites, wrap_probability
        As in :class:`Encoding`.
    noise_multiplier : float
        Target ratio of the honest shares' total noise to ``l2_sensitivity`` (> 0).
    honest_shares : int
        Fewest honest shares every sum holds (``min_cohort - max_colluders``).

    Returns
    -------
    Encoding
        Whose shares, ``honest_shares`` of them, are accounted with a noise
        multiplier of at least ``noise_multiplier`` (:func:`required_share_sigma`).

    Raises
    ------
    DdpError
        If the ring cannot hold ``max_sites`` shares at a resolution where rounding
        inflates a record's sensitivity by less than ``MAX_INFLATION``; the message
        says what to lower.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DdpError(f"noise_multiplier must be positive and finite, got {noise_multiplier!r}")
    if honest_shares < 1 or honest_shares > max_sites:
        raise DdpError(f"honest_shares must lie in [1, max_sites = {max_sites}], got {honest_shares}")
    d = padded_dim(dim)
    k = _tail_factor(d, wrap_probability)
    per_share = noise_multiplier / math.sqrt(honest_shares)
    # ring_bound <= slope * scale + constant, as share_sigma <= per_share * l2 + (r / sqrt(h) + 1)
    slope = max_sites * sum_bound * k / math.sqrt(d) + math.sqrt(max_sites) * k * per_share * clip
    extra = KERNEL_SCALE / math.sqrt(honest_shares) + 1.0
    constant = math.sqrt(max_sites) * k * (per_share * math.sqrt(d) + extra) + max_sites
    scale = (RING_MAX - constant) / slope
    scale = min(scale, ((MAX_SIGMA - extra) / per_share - math.sqrt(d)) / clip)
    if not scale * clip * (MAX_INFLATION - 1.0) >= math.sqrt(d):
        raise DdpError(
            f"Z_2^{RING_BITS} cannot hold {max_sites} shares of dimension {d} with sum bound "
            f"{sum_bound} (clip {clip}, noise multiplier {noise_multiplier}) at a resolution "
            f"where rounding adds under {MAX_INFLATION - 1:.0%} to a record's sensitivity: lower "
            "sum_bound, the cohort or the dimension"
        )
    sigma = required_share_sigma(noise_multiplier, scale * clip + math.sqrt(d), honest_shares)
    return Encoding(
        dim=dim,
        clip=clip,
        sum_bound=sum_bound,
        scale=scale,
        share_sigma=sigma,
        max_sites=max_sites,
        wrap_probability=wrap_probability,
    )


def rotation_signs(seed: bytes, d: int) -> np.ndarray:
    """The round's public random signs ``D`` (``±1.0``), from a 32-byte public seed.

    The seed is hashed with a domain tag into an AES key, so a seed used elsewhere
    in the round gives unrelated signs here.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise DdpError(f"the rotation seed must be {KEY_BYTES} bytes")
    key = hashlib.sha256(_ROTATION_DOMAIN + bytes(seed)).digest()
    return np.where(NoiseRandom(key).bits(d), -1.0, 1.0)


def hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform ``H x / sqrt(d)`` (``d`` a power of two).

    ``H`` is symmetric and ``(H / sqrt(d))^2 = I``, so the transform is its own inverse.
    """
    d = x.shape[0]
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < d:
        y = y.reshape(-1, 2, h)
        y = np.concatenate((y[:, :1] + y[:, 1:], y[:, :1] - y[:, 1:]), axis=1)
        h *= 2
    return y.reshape(d) / math.sqrt(d)


def _real_vector(x: np.ndarray, dim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (dim,) or arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise DdpError(
            f"a site's clipped sum must be a real vector of length {dim}, "
            f"got dtype {arr.dtype} and shape {arr.shape}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DdpError("a site's clipped sum holds NaN or inf; it cannot be encoded")
    return arr


def encode_share(
    clipped_sum: np.ndarray, encoding: Encoding, rotation_seed: bytes, rng: NoiseRandom | None = None
) -> np.ndarray:
    """A site's noisy share of the round's sum, in Z_2^32.

    Parameters
    ----------
    clipped_sum : numpy.ndarray
        The site's sum of clipped records (length ``encoding.dim``).
    encoding : Encoding
        The round's public parameters (checked against the site's policy first:
        :func:`fedseal.common.ddp.shares.check_share`).
    rotation_seed : bytes
        The round's public 32-byte rotation seed.
    rng : NoiseRandom, optional
        Randomness for rounding and noise; omitted (production): a fresh
        ``NoiseRandom()`` keyed from ``os.urandom``.

    Returns
    -------
    numpy.ndarray
        ``uint32`` vector of length ``encoding.padded_dim``, to be masked and sent.

    Raises
    ------
    DdpError
        If ``clipped_sum`` has the wrong shape or holds NaN/inf.
    """
    v = _real_vector(clipped_sum, encoding.dim)
    norm = float(np.linalg.norm(v))
    if norm > encoding.sum_bound:
        v *= encoding.sum_bound / norm
    rng = NoiseRandom() if rng is None else rng
    d = encoding.padded_dim
    padded = np.zeros(d)
    padded[: encoding.dim] = v
    x = encoding.scale * hadamard(rotation_signs(rotation_seed, d) * padded)
    share = np.floor(x + rng.uniform(d)).astype(np.int64)
    if encoding.share_sigma:
        share += sample_discrete_gaussian(int(encoding.share_sigma), d, rng)
    return (share & 0xFFFFFFFF).astype(np.uint32)


def decode_sum(ring_sum: np.ndarray, encoding: Encoding, rotation_seed: bytes, sites: int) -> np.ndarray:
    """The real-valued noisy sum from the unmasked ring sum of ``sites`` shares.

    Parameters
    ----------
    ring_sum : numpy.ndarray
        ``uint32`` vector of length ``encoding.padded_dim``: the sum mod 2^32.
    encoding : Encoding
        The round's public parameters, as the sites encoded with.
    rotation_seed : bytes
        The round's public rotation seed.
    sites : int
        Number of shares in the sum (``1 <= sites <= encoding.max_sites``).

    Returns
    -------
    numpy.ndarray
        ``float64`` vector of length ``encoding.dim``: the sum of the sites' bounded
        clipped sums plus the noise, over ``scale``.

    Raises
    ------
    DdpError
        If ``ring_sum`` is not a uint32 vector of the padded length or ``sites`` is out of range.
    SumRangeError
        If a coordinate, or the sum's L2 norm, lies beyond what ``sites`` honest shares
        reach (see the module docstring and :meth:`Encoding.norm_bound`).
    """
    arr = np.asarray(ring_sum)
    if arr.dtype != np.uint32 or arr.shape != (encoding.padded_dim,):
        raise DdpError(
            f"a ring sum must be a uint32 vector of length {encoding.padded_dim}, "
            f"got dtype {arr.dtype} and shape {arr.shape}"
        )
    if isinstance(sites, bool) or not 1 <= sites <= encoding.max_sites:
        raise DdpError(f"sites must lie in [1, {encoding.max_sites}], got {sites!r}")
    signed = arr.astype("<u4").view("<i4").astype(np.float64)
    bound = encoding.ring_bound(sites)
    outside = int(np.count_nonzero(np.abs(signed) > bound))
    if outside:
        raise SumRangeError(
            f"{outside} coordinates of the sum lie beyond what {sites} honest "
            f"shares reach ({bound:.4g}): a site sent a share the protocol "
            "cannot produce"
        )
    norm, norm_bound = float(np.linalg.norm(signed)), encoding.norm_bound(sites)
    if norm > norm_bound:
        raise SumRangeError(
            f"the sum's L2 norm {norm:.4g} lies beyond what {sites} honest "
            f"shares reach ({norm_bound:.4g}): a site sent a share the protocol "
            "cannot produce"
        )
    rotated = hadamard(signed / encoding.scale)
    return (rotation_signs(rotation_seed, encoding.padded_dim) * rotated)[: encoding.dim]


__all__ = [
    "DEFAULT_WRAP_PROBABILITY",
    "Encoding",
    "MAX_INFLATION",
    "RING_BITS",
    "decode_sum",
    "encode_share",
    "hadamard",
    "padded_dim",
    "plan_encoding",
    "required_share_sigma",
    "rotation_signs",
]
