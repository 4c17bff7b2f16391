"""Shared definitions of the SecAgg+ message flow (active-adversary variant).

Round structure (one :class:`~fedseal.common.secagg.client.ClientState` per node and
one :class:`~fedseal.common.secagg.server.ServerState` per round; pure state
transitions, no I/O). ``ctx`` is the :class:`~fedseal.common.secagg.messages.RoundContext`
(run, round, participants, k, t, the server's challenge key) that every
signature binds::

    stage 0  client.advertise_keys()          -> Advert (signed: c_send, s_pk, one
                                                 receive key per neighbour; proof of
                                                 possession of s_pk)
             server.collect_adverts(adverts)  -> per node: its neighbours' adverts   (U1)
    stage 1  client.share_keys(bundle)        -> ShareMessage (signed commitments and
                                                 ciphertext digests) + ciphertexts
             server.collect_shares(replies)   -> per node: {sender: (message, ct)}   (U2)
    stage 2  client.masked_input(routed, x)   -> y, complaints
             server.collect_masked(replies)   -> View (survivors, dropped)          (U3)
    stage 3  client.sign_view(view)           -> signature of the view
             server.collect_signatures(sigs)  -> per signer: the signatures it needs
    stage 4  client.unmask(view, signatures)  -> {"b_shares", "sk_shares", "seeds"}
             server.finalize(replies)         -> sum of x_i over the survivors (mod 2**32)

Masking: ``y_i = x_i + PRG(b_i) + sum_{j in M(i), j > i} PRG(s_ij)
- sum_{j in M(i), j < i} PRG(s_ij)  (mod 2**32)`` where ``b_i`` is a fresh
random seed, ``s_ij = agree(s_sk_i, s_pk_j, purpose=b"mask")`` and ``M(i)``
the neighbours whose share ciphertexts reached ``i``.

Threat model: a server that lies (about keys, routing, who dropped out, or by
asking twice), honest sites that refuse whatever would let it unmask one
input, and malicious sites that can send any well-formed message: each reply
is checked on its own and a bad one drops its sender only (docs/privacy.md,
"Secure aggregation", for the argument; docs/threat-model.md for what remains).
"""

from __future__ import annotations

import enum
import struct

from .crypto import NONCE_BYTES, check_uint64
from .errors import InvalidMessageError
from .shamir import SECRET_BYTES

__all__ = [
    "B_SHARES",
    "SK_SHARES",
    "SEEDS",
    "PURPOSE_SHARE",
    "PURPOSE_MASK",
    "SHARE_PLAINTEXT_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "ClientStage",
    "ServerStage",
    "encode_share_payload",
    "decode_share_payload",
]

B_SHARES = "b_shares"
"""Key of the self-mask seed shares in an unmask reply."""
SK_SHARES = "sk_shares"
"""Key of the mask private-key shares in an unmask reply."""
SEEDS = "seeds"
"""Key of the pairwise mask seeds with dropped neighbours in an unmask reply."""

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
    """Progress of a :class:`~fedseal.common.secagg.client.ClientState`."""

    INIT = "init"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"


class ServerStage(enum.Enum):
    """Progress of a :class:`~fedseal.common.secagg.server.ServerState`."""

    COLLECT_KEYS = "collect_keys"
    COLLECT_SHARES = "collect_shares"
    COLLECT_MASKED = "collect_masked"
    COLLECT_SIGNATURES = "collect_signatures"
    COLLECT_UNMASK = "collect_unmask"
    DONE = "done"


def encode_share_payload(sender: int, receiver: int, index: int, b_share: bytes, sk_share: bytes) -> bytes:
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
        raise InvalidMessageError(f"shares must be {SECRET_BYTES} bytes; the payload cannot be built")
    return (
        _PAYLOAD.pack(check_uint64(sender, "sender"), check_uint64(receiver, "receiver"), index)
        + bytes(b_share)
        + bytes(sk_share)
    )


def decode_share_payload(payload: bytes, *, sender: int, receiver: int) -> tuple[int, bytes, bytes]:
    """Parse and check a decrypted share payload.

    Parameters
    ----------
    payload : bytes
        Output of :func:`~fedseal.common.secagg.crypto.decrypt_share`.
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
            f"share from node {sender} carries invalid Shamir index 0; node {receiver} cannot use it"
        )
    off = _PAYLOAD.size
    return index, payload[off : off + SECRET_BYTES], payload[off + SECRET_BYTES :]
