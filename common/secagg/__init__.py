"""SecAgg+ secure aggregation as pure state transitions.

Implements SecAgg+ (Bell et al., CCS 2020) with Bonawitz et al. (CCS 2017)
SecAgg as the special case ``k >= n - 1``, over the ring ``Z_{2^32}``. The
package has no I/O: :class:`ClientState` and :class:`ServerState` consume and
produce plain messages (dicts of ``bytes`` / ``int`` / ``numpy.ndarray``) that a
transport layer (e.g. a Flower workflow) carries. Only the standard library,
numpy, ``cryptography`` and pycryptodome's Shamir sharing are used; all secrets
come from the OS CSPRNG.
"""

from .client import ClientState
from .crypto import (
    agree,
    decrypt_share,
    encrypt_share,
    generate_key_pair,
    public_key_from_private,
    validate_public_key,
)
from .errors import (
    ConfigError,
    InvalidMessageError,
    InvalidUpdateError,
    ProtocolAbort,
    SecAggError,
    ShareDecryptionError,
    StageError,
    UnmaskRefusedError,
)
from .graph import default_k, default_threshold, neighbours, validate_parameters
from .identity import Identity, Roster, generate_identity
from .messages import Advert, RoundContext, ShareMessage, View
from .prg import apply_masks, expand_mask
from .quantize import QuantConfig, dequantize_sum, quantize, to_fixed_point
from .server import ServerState
from .shamir import combine_shares, split_secret
from .simulate import DROP_STAGES, RoundResult, make_identities, run_round, simulate_round

__all__ = [
    "Advert",
    "ClientState",
    "Identity",
    "Roster",
    "RoundContext",
    "ServerState",
    "ShareMessage",
    "View",
    "QuantConfig",
    "RoundResult",
    "DROP_STAGES",
    "SecAggError",
    "ConfigError",
    "InvalidMessageError",
    "InvalidUpdateError",
    "ProtocolAbort",
    "ShareDecryptionError",
    "StageError",
    "UnmaskRefusedError",
    "agree",
    "combine_shares",
    "decrypt_share",
    "default_k",
    "default_threshold",
    "dequantize_sum",
    "encrypt_share",
    "apply_masks",
    "expand_mask",
    "generate_identity",
    "generate_key_pair",
    "make_identities",
    "neighbours",
    "public_key_from_private",
    "quantize",
    "run_round",
    "simulate_round",
    "split_secret",
    "to_fixed_point",
    "validate_parameters",
    "validate_public_key",
]
