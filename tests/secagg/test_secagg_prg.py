"""AES-CTR mask expansion."""

from __future__ import annotations

import os

import numpy as np
import pytest
from Crypto.Cipher import AES

from fedseal.common.secagg import InvalidMessageError, apply_masks, expand_mask


def test_deterministic_dtype_length() -> None:
    seed = os.urandom(32)
    a, b = expand_mask(seed, 1000), expand_mask(seed, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, b)
    assert a.flags.writeable


def test_different_seeds_differ() -> None:
    a = expand_mask(os.urandom(32), 1000)
    b = expand_mask(os.urandom(32), 1000)
    assert np.count_nonzero(a == b) < 5


def test_prefix_consistent_across_chunk_boundaries() -> None:
    seed = os.urandom(32)
    long = expand_mask(seed, 300_001)  # > 1 MiB, crosses a chunk boundary
    assert np.array_equal(long[:1000], expand_mask(seed, 1000))
    assert np.array_equal(long[262_140:262_150], expand_mask(seed, 262_150)[262_140:])


def test_matches_independent_aes_ctr() -> None:
    seed = bytes(range(32))
    ref = AES.new(seed, AES.MODE_CTR, nonce=b"", initial_value=0).encrypt(bytes(4 * 777))
    assert np.array_equal(expand_mask(seed, 777), np.frombuffer(ref, dtype="<u4"))


def test_zero_length_and_bad_input() -> None:
    assert expand_mask(os.urandom(32), 0).shape == (0,)
    with pytest.raises(InvalidMessageError):
        expand_mask(b"short", 10)
    with pytest.raises(InvalidMessageError):
        expand_mask(os.urandom(32), -1)


def test_output_looks_uniform() -> None:
    m = expand_mask(os.urandom(32), 100_000).astype(np.float64) / 2**32
    assert abs(m.mean() - 0.5) < 0.01
    hist, _ = np.histogram(m, bins=16, range=(0.0, 1.0))
    assert hist.min() > 100_000 / 16 * 0.9


def test_apply_masks_equals_adding_and_subtracting_each_expanded_mask():
    length = 2 * (1 << 17) + 12_345  # three blocks, the last one partial
    x = np.random.default_rng(0).integers(0, 2**32, length, dtype=np.uint32)
    masks = [(os.urandom(32), 1), (os.urandom(32), -1), (os.urandom(32), 1)]
    expected = x.copy()
    for seed, sign in masks:
        (np.add if sign == 1 else np.subtract)(expected, expand_mask(seed, length), out=expected)
    y = x.copy()
    apply_masks(y, masks)
    assert np.array_equal(y, expected)
    apply_masks(y, [(seed, -sign) for seed, sign in masks])  # and they come off again
    assert np.array_equal(y, x)


def test_apply_masks_refuses_a_bad_seed_sign_or_vector():
    y = np.zeros(10, dtype=np.uint32)
    with pytest.raises(InvalidMessageError, match="32 bytes"):
        apply_masks(y, [(b"short", 1)])
    with pytest.raises(InvalidMessageError, match="not 0"):
        apply_masks(y, [(os.urandom(32), 0)])
    with pytest.raises(InvalidMessageError, match="uint32"):
        apply_masks(np.zeros(10, dtype=np.int64), [(os.urandom(32), 1)])
    assert not y.any()  # nothing applied before the checks passed
