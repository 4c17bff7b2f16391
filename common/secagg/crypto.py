"""Key agreement and authenticated share encryption for SecAgg+.

* Key pairs are X25519, exchanged as raw 32-byte strings.
* :func:`agree` runs X25519 and derives a 32-byte key with HKDF-SHA256 whose
  ``info`` binds a purpose label, the run id, the round id and the two node ids
  (in sorted order, so both endpoints derive the same key).
* :func:`encrypt_share` / :func:`decrypt_share` use AES-256-GCM with a fresh
  random 12-byte nonce prepended to the ciphertext. The associated data is a
  fixed-width encoding of ``(sender, receiver, run_id, round_id)`` so that a
  ciphertext replayed from another round or run, or relayed to a node other than
  its intended receiver, fails authentication.

All randomness comes from the operating system CSPRNG (``os.urandom``, which is
also what ``cryptography`` uses internally for key generation).
"""

from __future__ import annotations

import hmac
import operator
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import InvalidMessageError, ShareDecryptionError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "MAX_UINT64",
    "generate_key_pair",
    "public_key_from_private",
    "validate_public_key",
    "agree",
    "encrypt_share",
    "decrypt_share",
    "check_uint64",
    "POP_LABEL",
    "proof_of_possession",
    "check_proof_of_possession",
]

KEY_BYTES = 32
"""Length of raw X25519 keys and of derived symmetric keys."""

NONCE_BYTES = 12
"""Length of the AES-GCM nonce prepended to every share ciphertext."""

MAX_UINT64 = 2**64 - 1
"""Largest node id / run id / round id that fits the fixed-width encodings."""

_TAG_BYTES = 16
_KDF_LABEL = b"fedseal-secagg-v1"
_AD_LABEL = b"FSSA"
POP_LABEL = b"fedseal-secagg-v2 pop\x00"
"""Domain label of :func:`proof_of_possession`'s HKDF info."""


def check_uint64(value: object, what: str) -> int:
    """Validate that ``value`` is an integer in ``[0, 2**64 - 1]``.

    Parameters
    ----------
    value : object
        The value to check (node id, run id or round id), as received.
    what : str
        Human-readable name used in the error message.

    Returns
    -------
    int
        ``value`` converted to a plain Python ``int``.

    Raises
    ------
    InvalidMessageError
        If ``value`` is not an integer or lies outside the unsigned 64-bit range.
    """
    if isinstance(value, (bool, np.bool_)):
        value_int = None
    else:
        try:
            value_int = operator.index(value)  # type: ignore[arg-type]  # TypeError caught below
        except TypeError:
            value_int = None
    if value_int is None:
        raise InvalidMessageError(
            f"{what} must be an integer, got {type(value).__name__}; "
            "the message cannot be attributed to a valid round participant"
        )
    value = value_int
    if not 0 <= value <= MAX_UINT64:
        raise InvalidMessageError(
            f"{what}={value} is outside the unsigned 64-bit range; "
            "the message cannot be attributed to a valid round participant"
        )
    return int(value)


def _check_key_bytes(key: object, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidMessageError(
            f"{what} must be bytes, got {type(key).__name__}; the key cannot be used in this round"
        )
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise InvalidMessageError(
            f"{what} must be {KEY_BYTES} bytes, got {len(key)}; the key cannot be used in this round"
        )
    return key


def generate_key_pair() -> tuple[bytes, bytes]:
    """Create a fresh X25519 key pair.

    Returns
    -------
    tuple[bytes, bytes]
        ``(private_key, public_key)``, both raw 32-byte strings.
    """
    sk = X25519PrivateKey.generate()
    private = sk.private_bytes(
        encoding=serialization.Encoding.Raw,
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public = sk.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
    return private, public


def public_key_from_private(private_key: bytes) -> bytes:
    """Derive the raw X25519 public key belonging to a raw private key.

    Parameters
    ----------
    private_key : bytes
        Raw 32-byte X25519 private key.

    Returns
    -------
    bytes
        The matching raw 32-byte public key.

    Raises
    ------
    InvalidMessageError
        If ``private_key`` is not 32 bytes.
    """
    private_key = _check_key_bytes(private_key, "private key")
    return (
        X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(
            encoding=serialization.Encoding.Raw,
            format=serialization.PublicFormat.Raw,
        )
    )


def validate_public_key(public_key: object, *, owner: int, name: str = "public key") -> bytes:
    """Check that a raw X25519 public key is usable for key agreement.

    Rejects keys of the wrong length and low-order points (for which every
    key agreement yields the all-zero secret).

    Parameters
    ----------
    public_key : bytes
        Raw 32-byte X25519 public key.
    owner : int
        Node id of the key's owner (used in the error message).
    name : str, optional
        Name of the key in error messages.

    Returns
    -------
    bytes
        The key as ``bytes``.

    Raises
    ------
    InvalidMessageError
        If the key is malformed or a low-order point.
    """
    public_key = _check_key_bytes(public_key, f"{name} of node {owner}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        raise InvalidMessageError(
            f"{name} of node {owner} is a low-order point; no secure key can be agreed "
            f"with it, so node {owner} cannot take part in this round"
        ) from None
    return public_key


def agree(
    private_key: bytes,
    peer_public: bytes,
    *,
    run_id: int,
    round_id: int,
    node_a: int,
    node_b: int,
    purpose: bytes,
) -> bytes:
    """Derive a 32-byte symmetric key shared by two nodes.

    Performs X25519 between ``private_key`` and ``peer_public`` and feeds the
    shared secret to HKDF-SHA256 (no salt). The HKDF ``info`` is::

        b"fedseal-secagg-v1" || len(purpose) (2 bytes) || purpose
            || run_id || round_id || min(node_a, node_b) || max(node_a, node_b)

    with every integer encoded as a big-endian unsigned 64-bit value. Because the
    node ids are sorted, both endpoints derive the same key, and keys for
    different purposes, runs or rounds are independent.

    Parameters
    ----------
    private_key : bytes
        Own raw 32-byte X25519 private key.
    peer_public : bytes
        Peer's raw 32-byte X25519 public key.
    run_id : int
        Flower run id (unsigned 64-bit).
    round_id : int
        Server round number (non-negative, < 2**64).
    node_a, node_b : int
        The two node ids (unsigned 64-bit); order does not matter.
    purpose : bytes
        Domain-separation label, e.g. ``b"share-enc"`` or ``b"mask"``.

    Returns
    -------
    bytes
        A 32-byte derived key.

    Raises
    ------
    InvalidMessageError
        If a key has the wrong length, the peer key is a low-order point (the
        X25519 result is all zeros), or an id is out of range.
    """
    private_key = _check_key_bytes(private_key, "private key")
    peer_public = _check_key_bytes(peer_public, "peer public key")
    run_id = check_uint64(run_id, "run_id")
    round_id = check_uint64(round_id, "round_id")
    node_a = check_uint64(node_a, "node id")
    node_b = check_uint64(node_b, "node id")
    if not isinstance(purpose, bytes) or not purpose or len(purpose) > 0xFFFF:
        raise InvalidMessageError(
            "purpose must be a non-empty bytes label of at most 65535 bytes; "
            "no key can be derived without domain separation"
        )
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:
        raise InvalidMessageError(
            f"public key of node {node_b if node_a < node_b else node_a} is "
            f"malformed or a low-order point ({exc}); no key can be agreed with "
            "that node, so it cannot take part in this round"
        ) from exc
    lo, hi = sorted((node_a, node_b))
    info = (
        _KDF_LABEL
        + struct.pack(">H", len(purpose))
        + purpose
        + struct.pack(">QQQQ", run_id, round_id, lo, hi)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _associated_data(sender: int, receiver: int, run_id: int, round_id: int) -> bytes:
    return _AD_LABEL + struct.pack(
        ">QQQQ",
        check_uint64(sender, "sender"),
        check_uint64(receiver, "receiver"),
        check_uint64(run_id, "run_id"),
        check_uint64(round_id, "round_id"),
    )


def encrypt_share(
    key: bytes,
    plaintext: bytes,
    *,
    sender: int,
    receiver: int,
    run_id: int,
    round_id: int,
) -> bytes:
    """Encrypt a secret-share payload with AES-256-GCM.

    Parameters
    ----------
    key : bytes
        32-byte key from :func:`agree` (purpose ``b"share-enc"``).
    plaintext : bytes
        Payload to protect.
    sender, receiver : int
        Node ids of the sender and the intended receiver.
    run_id, round_id : int
        Run and round the ciphertext belongs to.

    Returns
    -------
    bytes
        ``nonce (12 bytes) || ciphertext || tag (16 bytes)``. The nonce is drawn
        from ``os.urandom``; ``(sender, receiver, run_id, round_id)`` is
        authenticated as associated data.

    Raises
    ------
    InvalidMessageError
        If the key is not 32 bytes or an id is out of range.
    """
    key = _check_key_bytes(key, "share-encryption key")
    ad = _associated_data(sender, receiver, run_id, round_id)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, bytes(plaintext), ad)


def decrypt_share(
    key: bytes,
    ciphertext: bytes,
    *,
    sender: int,
    receiver: int,
    run_id: int,
    round_id: int,
) -> bytes:
    """Decrypt and authenticate a payload produced by :func:`encrypt_share`.

    Parameters
    ----------
    key : bytes
        32-byte key from :func:`agree` (purpose ``b"share-enc"``).
    ciphertext : bytes
        ``nonce || ciphertext || tag`` as returned by :func:`encrypt_share`.
    sender, receiver : int
        Expected sender and receiver node ids.
    run_id, round_id : int
        Expected run and round.

    Returns
    -------
    bytes
        The authenticated plaintext.

    Raises
    ------
    ShareDecryptionError
        If authentication fails: the ciphertext was tampered with, replayed from
        another round/run, or delivered to the wrong receiver.
    InvalidMessageError
        If the ciphertext is too short to be valid or not bytes.
    """
    key = _check_key_bytes(key, "share-encryption key")
    if not isinstance(ciphertext, (bytes, bytearray, memoryview)):
        raise InvalidMessageError(
            f"share ciphertext from node {sender} must be bytes, got "
            f"{type(ciphertext).__name__}; the share cannot be used in this round"
        )
    ciphertext = bytes(ciphertext)
    if len(ciphertext) < NONCE_BYTES + _TAG_BYTES:
        raise InvalidMessageError(
            f"share ciphertext from node {sender} is {len(ciphertext)} bytes, "
            f"shorter than nonce+tag ({NONCE_BYTES + _TAG_BYTES}); it is truncated "
            "and cannot be used in this round"
        )
    ad = _associated_data(sender, receiver, run_id, round_id)
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, ad)
    except InvalidTag:
        raise ShareDecryptionError(
            f"share from node {sender} to node {receiver} failed authentication: "
            f"tampered, or replayed from another round/run (expected run {run_id}, "
            f"round {round_id}), or delivered to the wrong receiver; node "
            f"{receiver} cannot continue this round"
        ) from None


def _exchange(private_key: bytes, public_key: bytes) -> bytes:
    """X25519; ValueError for a low-order peer key (all-zero shared secret)."""
    return X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(public_key)
    )


def _pop_from_shared(shared: bytes, ctx_digest: bytes, node: int, public_key: bytes) -> bytes:
    info = POP_LABEL + bytes(ctx_digest) + struct.pack(">Q", check_uint64(node, "node id")) + public_key
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def proof_of_possession(private_key: bytes, challenge: bytes, *, ctx_digest: bytes, node: int) -> bytes:
    """Prove knowledge of an X25519 private key to the holder of the round's challenge key.

    ``HKDF-SHA256(X25519(private_key, challenge), info = POP_LABEL || ctx_digest
    || node (u64) || public_key)``, 32 bytes. Only someone holding
    ``private_key`` (or the challenge's private key) can compute it, so a site
    that copies another site's public key cannot produce the proof. The output is
    an HKDF expansion under a label no other key derivation uses, so it reveals
    nothing about any pairwise secret of ``private_key``.

    Raises
    ------
    InvalidMessageError
        If a key has the wrong length or the challenge is a low-order point.
    """
    private_key = _check_key_bytes(private_key, "private key")
    try:
        shared = _exchange(private_key, _check_key_bytes(challenge, "challenge key"))
    except ValueError:
        raise InvalidMessageError(
            "the round's challenge key is a low-order point; the "
            "server is misbehaving and this round cannot go on"
        ) from None
    return _pop_from_shared(shared, ctx_digest, node, public_key_from_private(private_key))


def check_proof_of_possession(
    challenge_private: bytes, public_key: bytes, proof: bytes, *, ctx_digest: bytes, node: int
) -> bool:
    """Server side of :func:`proof_of_possession`: whether ``proof`` is right for ``public_key``."""
    public_key = _check_key_bytes(public_key, "public key")
    try:
        shared = _exchange(_check_key_bytes(challenge_private, "challenge private key"), public_key)
    except ValueError:
        return False
    expected = _pop_from_shared(shared, ctx_digest, node, public_key)
    return isinstance(proof, (bytes, bytearray)) and hmac.compare_digest(expected, bytes(proof))
