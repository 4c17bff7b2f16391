"""Shared definitions of the SecAgg+ message flow.

Round structure (one :class:`~common.secagg.client.ClientState` per node and
one :class:`~common.secagg.server.ServerState` per round; all pure state
transitions, no I/O)::

    stage 0  client.advertise_keys()            -> {"c_pk", "s_pk"}
             server.broadcast_keys(adverts)     -> per-node bundle of neighbour keys   (U1)
    stage 1  client.share_keys(bundle)          -> {receiver: ciphertext}
             server.route_shares(shares)        -> {receiver: {sender: ciphertext}}  (U2)
    stage 2  client.masked_input(cts, x)        -> y (uint32 vector)
             server.add_masked_input(i, y)      (one call per arriving vector)       (U3)
             server.unmask_request()            -> (survivors, dropped)
    stage 3  client.unmask(survivors, dropped)  -> {"b_shares", "sk_shares"}
             server.finalize(replies)           -> sum of x_i over U3 (mod 2**32)  (U4)

Masking: ``y_i = x_i + PRG(b_i) + sum_{j in N(i) cap U2, j > i} PRG(s_ij)
- sum_{j in N(i) cap U2, j < i} PRG(s_ij)  (mod 2**32)`` where ``b_i`` is a
fresh random seed and ``s_ij = agree(s_sk_i, s_pk_j, purpose=b"mask")``.

Messages are plain dicts of ``bytes``, ``int`` and ``numpy.ndarray`` (see the
constants below) so a transport layer can serialise them directly.

Threat model: honest-but-curious server and clients, plus a server that may
lie about who dropped out (defeated by the majority threshold and by clients
refusing contradictory unmask requests). Public keys are not signed (no PKI
and no consistency-check round), so an actively malicious server that
substitutes public keys is out of scope.
"""

from __future__ import annotations

import enum
import struct

from .crypto import NONCE_BYTES, check_uint64
from .errors import InvalidMessageError
from .shamir import SECRET_BYTES

__all__ = [
    "C_PK",
    "S_PK",
    "B_SHARES",
    "SK_SHARES",
    "PURPOSE_SHARE",
    "PURPOSE_MASK",
    "SHARE_PLAINTEXT_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "ClientStage",
    "ServerStage",
    "encode_share_payload",
    "decode_share_payload",
]

C_PK = "c_pk"
"""Key of the share-encryption public key in an advertise message."""
S_PK = "s_pk"
"""Key of the mask-agreement public key in an advertise message."""
B_SHARES = "b_shares"
"""Key of the self-mask seed shares in an unmask reply."""
SK_SHARES = "sk_shares"
"""Key of the mask private-key shares in an unmask reply."""

PURPOSE_SHARE = b"share-enc"
"""HKDF purpose label of the share-encryption key."""
PURPOSE_MASK = b"mask"
"""HKDF purpose label of pairwise mask seeds."""

_PAYLOAD = struct.Struct(">QQH")
SHARE_PLAINTEXT_BYTES = _PAYLOAD.size + 2 * SECRET_BYTES
"""Length of a decrypted share payload: sender, receiver, index, two shares."""
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + 16
"""Length of an encrypted share payload (nonce + payload + GCM tag)."""


class ClientStage(enum.Enum):
    """Progress of a :class:`~common.secagg.client.ClientState`."""

    INIT = "init"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


class ServerStage(enum.Enum):
    """Progress of a :class:`~common.secagg.server.ServerState`."""

    COLLECT_KEYS = "collect_keys"
    COLLECT_SHARES = "collect_shares"
    COLLECT_MASKED = "collect_masked"
    COLLECT_UNMASK = "collect_unmask"
    DONE = "done"


def encode_share_payload(
    sender: int, receiver: int, index: int, b_share: bytes, sk_share: bytes
) -> bytes:
    """Serialise the pair of shares one node sends to one neighbour.

    Parameters
    ----------
    sender, receiver : int
        Node ids (repeated inside the plaintext as a second binding).
    index : int
        Shamir index of the receiver's shares (``1 .. 65535``).
    b_share, sk_share : bytes
        32-byte shares of the sender's self-mask seed and mask private key.

    Returns
    -------
    bytes
        ``SHARE_PLAINTEXT_BYTES`` bytes.
    """
    if len(b_share) != SECRET_BYTES or len(sk_share) != SECRET_BYTES:
        raise InvalidMessageError(
            f"shares must be {SECRET_BYTES} bytes; the payload cannot be built"
        )
    return (
        _PAYLOAD.pack(check_uint64(sender, "sender"), check_uint64(receiver, "receiver"), index)
        + bytes(b_share)
        + bytes(sk_share)
    )


def decode_share_payload(
    payload: bytes, *, sender: int, receiver: int
) -> tuple[int, bytes, bytes]:
    """Parse and check a decrypted share payload.

    Parameters
    ----------
    payload : bytes
        Output of :func:`~common.secagg.crypto.decrypt_share`.
    sender, receiver : int
        The ids the payload must name.

    Returns
    -------
    tuple[int, bytes, bytes]
        ``(index, b_share, sk_share)``.

    Raises
    ------
    InvalidMessageError
        If the length is wrong, the embedded ids differ from the expected ones,
        or the index is 0.
    """
    if len(payload) != SHARE_PLAINTEXT_BYTES:
        raise InvalidMessageError(
            f"share payload from node {sender} has {len(payload)} bytes, expected "
            f"{SHARE_PLAINTEXT_BYTES}; node {receiver} cannot use it"
        )
    got_sender, got_receiver, index = _PAYLOAD.unpack_from(payload)
    if got_sender != sender or got_receiver != receiver:
        raise InvalidMessageError(
            f"share payload names sender {got_sender} -> receiver {got_receiver} but "
            f"was delivered as {sender} -> {receiver}; it was misrouted and node "
            f"{receiver} cannot use it"
        )
    if index < 1:
        raise InvalidMessageError(
            f"share from node {sender} carries invalid Shamir index 0; node "
            f"{receiver} cannot use it"
        )
    off = _PAYLOAD.size
    return index, payload[off : off + SECRET_BYTES], payload[off + SECRET_BYTES :]
