"""Exception hierarchy for the SecAgg+ package.

Every exception raised on purpose by :mod:`fedseal.common.secagg` derives from
:class:`SecAggError`, so a caller driving a round can catch one base class and
decide whether the round is lost (:class:`ProtocolAbort`) or whether a single
participant's message should simply be discarded (:class:`InvalidMessageError`,
:class:`ShareDecryptionError`).
"""

from __future__ import annotations

from fedseal.common.errors import FedsealError

__all__ = [
    "SecAggError",
    "ConfigError",
    "InvalidMessageError",
    "InvalidUpdateError",
    "ShareDecryptionError",
    "ProtocolAbort",
    "StageError",
    "UnmaskRefusedError",
]


class SecAggError(FedsealError):
    """Base class of every error raised by the secure-aggregation package."""

    code = "secagg.error"


class ConfigError(SecAggError, ValueError):
    """Invalid protocol or quantization parameters.

    Raised before any cryptographic work starts; the round cannot be run with
    these parameters and must be reconfigured.
    """


class InvalidMessageError(SecAggError, ValueError):
    """A protocol message is malformed or inconsistent with the round state.

    Examples: a masked vector of the wrong length or dtype, a message from a node
    that is not part of the round (or not part of the current stage), a duplicate
    message, a malformed public key. State objects are left unchanged when this is
    raised, so the caller may drop the offending message and continue.
    """


class InvalidUpdateError(SecAggError, ValueError):
    """A local model update cannot be encoded (e.g. it contains NaN or inf)."""


class ShareDecryptionError(SecAggError):
    """An encrypted secret share failed authentication.

    The ciphertext was tampered with, replayed from another round or run, or
    delivered to the wrong receiver. A site that gets one under its sender's
    valid signature complains (and keeps going); the server then blames the
    sender.
    """


class ProtocolAbort(SecAggError):
    """Too few participants (or too few shares) remain to finish the round.

    The aggregate cannot be recovered; the round must be discarded and retried.
    """


class StageError(SecAggError):
    """A protocol method was called out of order (or twice) for this round."""


class UnmaskRefusedError(SecAggError):
    """A site refused to go on because the server's request could break privacy.

    Raised when the survivor view or the unmask request contradicts what the
    site saw or lacks the signatures it needs (a server lying about who dropped
    out), when routed shares were altered, and when a round was already
    unmasked once.
    """
