"""Size buckets: the only site size any choice that leaves a site may depend on.

A site's exact example count never crosses to another party. Everything that
shapes a reply (sampling rate, noise, weights, the DP plan) is a function of the
site's *bucket*, the largest power of two not above its count, so sites of n and
n+1 examples send the same public metadata whenever they share a bucket.
"""

from __future__ import annotations

from fedseal.common.config import ConfigError


def size_bucket(num_examples: int) -> int:
    """The coarse size a site's choices may depend on: the largest power of two <= ``num_examples``.

    Raises
    ------
    ConfigError
        If the site has no examples.
    """
    if num_examples < 1:
        raise ConfigError("a site with no examples cannot train")
    return 1 << (int(num_examples).bit_length() - 1)


def check_bucket(bucket: int) -> int:
    """``bucket`` itself, if it is a size bucket (a power of two); ValueError otherwise.

    Every function whose result can leave a site takes a bucket, and refuses an
    exact count here, so a caller that passes ``len(examples)`` fails loudly.
    """
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1 or bucket & (bucket - 1):
        raise ValueError(
            f"expected a size bucket (a power of two), got {bucket!r}: pass "
            "size_bucket(n), never an exact count"
        )
    return bucket


__all__ = ["check_bucket", "size_bucket"]
