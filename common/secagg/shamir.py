"""Shamir t-of-n secret sharing of 32-byte secrets.

Built on :class:`Crypto.Protocol.SecretSharing.Shamir` (pycryptodome), which
shares 16-byte blocks over GF(2^128). A 32-byte secret is split into two
16-byte halves that are shared independently with the same share indices; the
two 16-byte share values of one index are concatenated into a 32-byte share.
Indices are ``1 .. num_shares``.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral

from Crypto.Protocol.SecretSharing import Shamir

from .errors import ConfigError, InvalidMessageError, ProtocolAbort

__all__ = ["SECRET_BYTES", "split_secret", "combine_shares"]

SECRET_BYTES = 32
"""Length of secrets and of individual shares, in bytes."""

_HALF = SECRET_BYTES // 2
_MAX_SHARES = 0xFFFF


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[tuple[int, bytes]]:
    """Split a 32-byte secret into ``num_shares`` shares, any ``threshold`` of which recover it.

    Parameters
    ----------
    secret : bytes
        The 32-byte secret (an X25519 private key or a mask seed).
    threshold : int
        Number of shares needed to reconstruct (``1 <= threshold <= num_shares``).
    num_shares : int
        Number of shares to create (at most 65535).

    Returns
    -------
    list[tuple[int, bytes]]
        ``num_shares`` pairs ``(index, share)`` with indices ``1 .. num_shares``
        and 32-byte share values.

    Raises
    ------
    ConfigError
        If the secret is not 32 bytes or the threshold / share count are invalid.
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise ConfigError(f"secret must be {SECRET_BYTES} bytes; it cannot be shared")
    threshold, num_shares = int(threshold), int(num_shares)
    if not 1 <= threshold <= num_shares <= _MAX_SHARES:
        raise ConfigError(
            f"need 1 <= threshold ({threshold}) <= num_shares ({num_shares}) <= "
            f"{_MAX_SHARES}; the secret cannot be shared with these parameters"
        )
    secret = bytes(secret)
    # pycryptodome's stub marks ``ssss`` as required; it defaults to False (plain Shamir)
    lo = Shamir.split(threshold, num_shares, secret[:_HALF], ssss=False)
    hi = Shamir.split(threshold, num_shares, secret[_HALF:], ssss=False)
    return [(i, a + b) for (i, a), (_, b) in zip(lo, hi, strict=True)]


def combine_shares(shares: Iterable[tuple[int, bytes]], threshold: int) -> bytes:
    """Reconstruct a 32-byte secret from at least ``threshold`` shares.

    Exactly ``threshold`` shares (those with the smallest indices) are used for
    interpolation; extra shares are ignored.

    Parameters
    ----------
    shares : Iterable[tuple[int, bytes]]
        ``(index, share)`` pairs as returned by :func:`split_secret`.
    threshold : int
        The threshold the secret was split with.

    Returns
    -------
    bytes
        The 32-byte secret (garbage, not an error, if shares were forged).

    Raises
    ------
    ConfigError
        If ``threshold < 1``.
    ProtocolAbort
        If fewer than ``threshold`` shares are given.
    InvalidMessageError
        If an index is duplicated or out of range, or a share is not 32 bytes.
    """
    threshold = int(threshold)
    if threshold < 1:
        raise ConfigError(f"threshold must be >= 1, got {threshold}; nothing can be reconstructed")
    seen: dict[int, bytes] = {}
    for item in shares:
        try:
            index, value = item
        except (TypeError, ValueError):
            raise InvalidMessageError(
                "a share must be an (index, bytes) pair; the secret cannot be reconstructed"
            ) from None
        if isinstance(index, bool) or not isinstance(index, Integral) or not 1 <= index <= _MAX_SHARES:
            raise InvalidMessageError(
                f"share index {index!r} is not an integer in 1..{_MAX_SHARES}; "
                "the secret cannot be reconstructed from it"
            )
        if not isinstance(value, (bytes, bytearray)) or len(value) != SECRET_BYTES:
            raise InvalidMessageError(
                f"share with index {index} must be {SECRET_BYTES} bytes; "
                "the secret cannot be reconstructed from it"
            )
        index = int(index)
        if index in seen:
            raise InvalidMessageError(
                f"duplicate share index {index}; shares are inconsistent and the "
                "secret cannot be reconstructed from them"
            )
        seen[index] = bytes(value)
    if len(seen) < threshold:
        raise ProtocolAbort(
            f"only {len(seen)} shares available but {threshold} are needed; "
            "the secret cannot be reconstructed"
        )
    chosen = sorted(seen.items())[:threshold]
    lo = Shamir.combine([(i, v[:_HALF]) for i, v in chosen], ssss=False)
    hi = Shamir.combine([(i, v[_HALF:]) for i, v in chosen], ssss=False)
    return lo + hi
