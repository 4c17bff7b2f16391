"""The encoding into Z_2^32: rotation, rounding, wrap-around, the server's decode and its checks,
the noise shares against a site's policy, and an in-process round of m sites."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from fedseal.common.ddp import (
    DdpError,
    Encoding,
    NoiseRandom,
    ShareRefusal,
    SumRangeError,
    check_share,
    decode_sum,
    encode_share,
    honest_shares,
    plan_encoding,
    required_share_sigma,
)
from fedseal.common.ddp.accounting import KERNEL_SCALE
from fedseal.common.ddp.encoding import RING_MAX, hadamard, padded_dim, rotation_signs

SEED = bytes(range(32))


def _ring_sum(shares: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(shares[0])
    for share in shares:
        total += share  # uint32 arithmetic wraps mod 2^32, as SecAgg+ sums
    return total


def _signed(share: np.ndarray) -> np.ndarray:
    return share.view(np.int32).astype(np.int64)


def test_hadamard_is_orthonormal_and_its_own_inverse() -> None:
    x = np.random.default_rng(0).normal(size=64)
    assert np.allclose(hadamard(x), scipy.linalg.hadamard(64) @ x / 8.0)
    assert np.allclose(hadamard(hadamard(x)), x)
    assert np.linalg.norm(hadamard(x)) == pytest.approx(np.linalg.norm(x))


def test_rotation_signs_come_from_the_public_seed() -> None:
    signs = rotation_signs(SEED, 256)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert np.array_equal(signs, rotation_signs(SEED, 256))
    assert not np.array_equal(signs, rotation_signs(bytes(32), 256))
    with pytest.raises(DdpError, match="32 bytes"):
        rotation_signs(b"short", 256)


@pytest.mark.parametrize("dim,expected", [(1, 1), (2, 2), (3, 4), (384, 512), (1024, 1024)])
def test_padding_to_a_power_of_two(dim, expected) -> None:
    assert padded_dim(dim) == expected


def _plain(dim: int = 300, sites: int = 5, **kw) -> Encoding:
    """An encoding without noise (the non-private arm), to see rounding alone."""
    base = plan_encoding(
        dim=dim, clip=1.0, sum_bound=50.0, max_sites=sites, noise_multiplier=1.0, honest_shares=2
    )
    return Encoding(dim=dim, clip=1.0, sum_bound=50.0, scale=base.scale, share_sigma=0, max_sites=sites, **kw)


def test_round_trip_is_within_the_rounding_bound_and_unbiased() -> None:
    enc, n = _plain(), 5
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=enc.dim) for _ in range(n)]
    errors = []
    for trial in range(40):
        noise = NoiseRandom(bytes([trial]) * 32)
        shares = [encode_share(x, enc, SEED, noise) for x in inputs]
        errors.append(decode_sum(_ring_sum(shares), enc, SEED, n) - sum(inputs))
    errors = np.array(errors)
    # each rounding error is below 1 in each of d coordinates; the rotation keeps L2 norms
    bound = n * math.sqrt(enc.padded_dim) / enc.scale
    assert np.linalg.norm(errors, axis=1).max() <= bound
    assert np.abs(errors).max() > 0  # the rounding is real ...
    # ... and unbiased: a coordinate's error has variance at most n/4 / scale^2 per trial
    assert np.abs(errors.mean(axis=0)).max() <= 6 * math.sqrt(n / 4 / len(errors)) / enc.scale


def test_a_sum_beyond_the_bound_is_projected() -> None:
    enc = _plain()
    big = np.zeros(enc.dim)
    big[3] = 10 * enc.sum_bound
    decoded = decode_sum(encode_share(big, enc, SEED, NoiseRandom(SEED)), enc, SEED, 1)
    assert decoded[3] == pytest.approx(enc.sum_bound, abs=1e-4)


def test_worst_case_sums_do_not_wrap() -> None:
    """Every site at its sum bound, all in one coordinate (the least flat input): the rotation
    spreads it, the honest bound holds, and the sum decodes."""
    z = 2.0
    enc = plan_encoding(dim=300, clip=1.0, sum_bound=500.0, max_sites=20, noise_multiplier=z, honest_shares=4)
    assert enc.ring_bound(20) <= RING_MAX
    spike = np.zeros(enc.dim)
    spike[0] = enc.sum_bound
    shares = [encode_share(spike, enc, SEED, NoiseRandom(bytes([i]) * 32)) for i in range(20)]
    assert max(np.abs(_signed(s)).max() for s in shares) < RING_MAX / 4
    decoded = decode_sum(_ring_sum(shares), enc, SEED, 20)
    noise_sd = math.sqrt(20) * enc.share_sigma / enc.scale
    assert abs(decoded[0] - 20 * enc.sum_bound) <= 6 * noise_sd
    assert np.abs(decoded[1:]).max() <= 7 * noise_sd


def test_rounding_moves_a_share_by_at_most_the_sensitivity() -> None:
    """The coupling the accountant relies on: with the same randomness, adding one record of
    norm ``clip`` moves the share by an integer vector of L2 norm below ``l2_sensitivity``."""
    enc = plan_encoding(dim=200, clip=0.5, sum_bound=40.0, max_sites=4, noise_multiplier=1.0, honest_shares=2)
    rng = np.random.default_rng(2)
    worst = 0.0
    for trial in range(50):
        base = rng.normal(size=enc.dim)
        record = rng.normal(size=enc.dim)
        record *= enc.clip / np.linalg.norm(record)
        key = bytes([trial]) * 32
        a = _signed(encode_share(base, enc, SEED, NoiseRandom(key)))
        b = _signed(encode_share(base + record, enc, SEED, NoiseRandom(key)))
        moved = float(np.linalg.norm(b - a))
        assert moved < enc.l2_sensitivity
        worst = max(worst, moved)
    assert worst > enc.scale * enc.clip  # the shift is real: at least the record's scaled norm


def test_plan_meets_the_noise_target_and_the_ring() -> None:
    for z, h, n in [(0.7, 2, 3), (3.0, 9, 10), (20.0, 5, 50)]:
        enc = plan_encoding(
            dim=1000, clip=1.0, sum_bound=100.0, max_sites=n, noise_multiplier=z, honest_shares=h
        )
        assert math.sqrt(h * enc.share_sigma**2 - KERNEL_SCALE**2) >= z * enc.l2_sensitivity
        assert enc.ring_bound(n) <= RING_MAX
        assert enc.l2_sensitivity / (enc.scale * enc.clip) < 1.01


def test_a_plan_the_ring_cannot_hold_is_refused() -> None:
    with pytest.raises(DdpError, match="lower sum_bound"):
        plan_encoding(
            dim=1 << 16, clip=1.0, sum_bound=1e9, max_sites=1000, noise_multiplier=1.0, honest_shares=2
        )


@pytest.mark.parametrize(
    "change,match",
    [
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"dim": 0}, "dim"),
        ({"dim": True}, "dim"),
        ({"share_sigma": 2.5}, "share_sigma"),
        ({"max_sites": 0}, "max_sites"),
        ({"wrap_probability": 0.0}, "wrap_probability"),
        ({"scale": 1e12}, "beyond the ring"),
        ({"share_sigma": 1 << 24, "max_sites": 400}, "beyond the ring"),
    ],
)
def test_server_sent_parameters_are_validated(change, match) -> None:
    fields = {
        "dim": 10,
        "clip": 1.0,
        "sum_bound": 10.0,
        "scale": 1000.0,
        "share_sigma": 5,
        "max_sites": 4,
    } | change
    with pytest.raises(DdpError, match=match):
        Encoding(**fields)


def test_malformed_inputs_are_refused() -> None:
    enc = _plain()
    with pytest.raises(DdpError, match="NaN"):
        encode_share(np.full(enc.dim, np.nan), enc, SEED)
    with pytest.raises(DdpError, match="length"):
        encode_share(np.zeros(enc.dim + 1), enc, SEED)
    with pytest.raises(DdpError, match="uint32"):
        decode_sum(np.zeros(enc.padded_dim, dtype=np.int64), enc, SEED, 1)
    with pytest.raises(DdpError, match="sites"):
        decode_sum(np.zeros(enc.padded_dim, dtype=np.uint32), enc, SEED, enc.max_sites + 1)


def test_an_out_of_range_share_is_caught_by_the_sum_check() -> None:
    """The adversary: one site adds 2^30 to one coordinate of its share (or wraps the ring)."""
    enc = plan_encoding(dim=100, clip=1.0, sum_bound=10.0, max_sites=4, noise_multiplier=1.0, honest_shares=2)
    shares = [encode_share(np.ones(enc.dim), enc, SEED, NoiseRandom(bytes([i]) * 32)) for i in range(4)]
    decode_sum(_ring_sum(shares), enc, SEED, 4)  # honest: fine
    for bad in (1 << 30, 1 << 31):
        tampered = [s.copy() for s in shares]
        tampered[2][7:8] += np.uint32(bad)
        with pytest.raises(SumRangeError, match="cannot produce"):
            decode_sum(_ring_sum(tampered), enc, SEED, 4)


def test_a_share_shifted_in_every_coordinate_is_caught_by_the_norm_check() -> None:
    """The adversary shifts every coordinate by less than the coordinate bound of the planned
    cohort (which fills the ring): the sum's L2 norm is beyond what honest shares reach."""
    enc = plan_encoding(dim=100, clip=1.0, sum_bound=10.0, max_sites=4, noise_multiplier=1.0, honest_shares=2)
    shares = [encode_share(np.full(enc.dim, 0.1), enc, SEED, NoiseRandom(bytes([i]) * 32)) for i in range(4)]
    shift = 2 * enc.norm_bound(4) / math.sqrt(enc.padded_dim)
    assert shift + np.abs(_signed(_ring_sum(shares))).max() < enc.ring_bound(4)
    tampered = [s.copy() for s in shares]
    tampered[1] += np.uint32(int(shift))
    with pytest.raises(SumRangeError, match="L2 norm"):
        decode_sum(_ring_sum(tampered), enc, SEED, 4)


# -- noise shares against the site policy ----------------------------------------------


def test_honest_shares_is_the_cohort_less_the_colluders() -> None:
    assert honest_shares(3, 1) == 2
    assert honest_shares(10, 0) == 10
    with pytest.raises(ShareRefusal, match="no honest share"):
        honest_shares(3, 3)


def test_required_share_reaches_the_target_with_the_honest_shares_only() -> None:
    for z, d2, h in [(1.0, 1000.0, 2), (2.7, 3.5e5, 9), (0.5, 40.0, 1)]:
        s = required_share_sigma(z, d2, h)
        assert math.sqrt(h * s * s - KERNEL_SCALE**2) >= z * d2
        assert math.sqrt(h * (s - 1) ** 2 - KERNEL_SCALE**2) < z * d2  # and is the smallest


def test_a_site_checks_the_rounds_share_against_its_policy() -> None:
    z = 1.5
    enc = plan_encoding(
        dim=64, clip=1.0, sum_bound=20.0, max_sites=10, noise_multiplier=z, honest_shares=honest_shares(5, 2)
    )
    mech = check_share(enc, noise_multiplier=z, min_cohort=5, max_colluders=2, cohort=10)
    assert mech.honest_shares == 3 and mech.noise_multiplier >= z
    assert mech.dim == enc.padded_dim and mech.l2_sensitivity == enc.l2_sensitivity
    # a stricter site (more colluders) needs bigger shares than this round has
    with pytest.raises(ShareRefusal, match="below the"):
        check_share(enc, noise_multiplier=z, min_cohort=5, max_colluders=3, cohort=10)
    # so does a site planning more noise
    with pytest.raises(ShareRefusal, match="below the"):
        check_share(enc, noise_multiplier=1.2 * z, min_cohort=5, max_colluders=2, cohort=10)
    with pytest.raises(ShareRefusal, match="min-cohort"):
        check_share(enc, noise_multiplier=z, min_cohort=5, max_colluders=2, cohort=4)
    with pytest.raises(ShareRefusal, match="at most 10 shares"):
        check_share(enc, noise_multiplier=z, min_cohort=5, max_colluders=2, cohort=11)


def test_a_server_cannot_turn_the_noise_off() -> None:
    enc = _plain(dim=64, sites=5)
    with pytest.raises(ShareRefusal, match="below the"):
        check_share(enc, noise_multiplier=1.0, min_cohort=3, max_colluders=1, cohort=5)


# -- one round in process ---------------------------------------------------------------


def test_m_sites_sum_decodes_to_the_clipped_sum_plus_the_planned_noise() -> None:
    """m sites clip their records, sum, encode with their shares; the ring sum decodes to the
    sum of clipped sums plus noise whose variance is m shares' (all sites add one), per
    coordinate after the inverse rotation."""
    m, dim, clip, z = 6, 1000, 1.0, 1.0
    h = honest_shares(4, 1)
    enc = plan_encoding(dim=dim, clip=clip, sum_bound=200.0, max_sites=m, noise_multiplier=z, honest_shares=h)
    rng = np.random.default_rng(3)
    sums = []
    for _ in range(m):
        records = rng.normal(size=(50, dim))
        records /= np.maximum(np.linalg.norm(records, axis=1, keepdims=True) / clip, 1.0)
        sums.append(records.sum(axis=0))
    shares = [encode_share(s, enc, SEED, NoiseRandom(bytes([10 + i]) * 32)) for i, s in enumerate(sums)]
    noise = decode_sum(_ring_sum(shares), enc, SEED, m) - sum(sums)
    var = m * enc.share_sigma**2 / enc.scale**2  # rotation keeps the per-coordinate variance
    rounding = m / 4 / enc.scale**2
    assert abs(noise.mean()) <= 5 * math.sqrt(var / dim)
    # sample variance of dim roughly Gaussian coordinates: standard error sqrt(2/dim) var
    assert abs(noise.var() - var) <= 5 * math.sqrt(2 / dim) * var + rounding
    # the honest shares alone carry the planned noise: h shares' std >= z * sensitivity
    honest_sd = math.sqrt(h) * enc.share_sigma / enc.scale
    assert honest_sd >= z * enc.l2_sensitivity / enc.scale >= z * clip
