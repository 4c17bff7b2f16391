"""Exceptions of the distributed discrete Gaussian mechanism."""

from __future__ import annotations

from fedseal.common.errors import FedsealError


class DdpError(FedsealError, ValueError):
    """Parameters of the distributed DP mechanism that cannot be used as given."""

    code = "ddp.error"


class ShareRefusal(DdpError):
    """A site's policy cannot be met by the round's noise share: the site must not send."""


class SumRangeError(DdpError):
    """A decoded ring sum lies outside what the honest sites can have produced."""


__all__ = ["DdpError", "ShareRefusal", "SumRangeError"]
