"""Shamir sharing of 32-byte secrets."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.common.secagg import (
    ConfigError,
    InvalidMessageError,
    ProtocolAbort,
    combine_shares,
    split_secret,
)


def test_every_threshold_subset_recovers() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, 5)
    assert [i for i, _ in shares] == [1, 2, 3, 4, 5]
    assert all(len(v) == 32 for _, v in shares)
    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset), 3) == secret
    assert combine_shares(shares, 3) == secret  # extra shares are fine


def test_fewer_than_threshold_shares_give_wrong_secret_or_abort() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, 5)
    with pytest.raises(ProtocolAbort, match="only 2 shares"):
        combine_shares(shares[:2], 3)
    assert combine_shares(shares[:2], 2) != secret


def test_duplicate_and_malformed_shares() -> None:
    shares = split_secret(os.urandom(32), 2, 3)
    with pytest.raises(InvalidMessageError, match="duplicate share index"):
        combine_shares([shares[0], shares[0]], 2)
    with pytest.raises(InvalidMessageError, match="32 bytes"):
        combine_shares([shares[0], (2, shares[1][1][:16])], 2)
    with pytest.raises(InvalidMessageError, match="index"):
        combine_shares([shares[0], (0, shares[1][1])], 2)


@pytest.mark.parametrize(
    "secret,t,n", [(b"x" * 31, 2, 3), (b"x" * 32, 0, 3), (b"x" * 32, 4, 3), (b"x" * 33, 1, 1)]
)
def test_bad_split_parameters(secret: bytes, t: int, n: int) -> None:
    with pytest.raises(ConfigError):
        split_secret(secret, t, n)


@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(1, 8),
    data=st.data(),
)
def test_roundtrip_property(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = split_secret(secret, t, n)
    subset = data.draw(st.permutations(shares)).copy()[:t]
    assert combine_shares(subset, t) == secret
