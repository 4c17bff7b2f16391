"""AES-CTR mask expansion."""

from __future__ import annotations

import os

import numpy as np
import pytest
from Crypto.Cipher import AES

from common.secagg import InvalidMessageError, expand_mask


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
