"""Pseudo-random mask expansion over the ring Z_{2^32}.

A 32-byte seed is used as an AES-256 key in CTR mode with a fixed all-zero
initial counter block; the keystream (the encryption of zero bytes) is read as
little-endian ``uint32`` words. Masks are added and subtracted with ordinary
``uint32`` numpy arithmetic, which wraps modulo ``2**32``.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .crypto import KEY_BYTES
from .errors import InvalidMessageError

__all__ = ["expand_mask", "MASK_DTYPE"]

MASK_DTYPE = np.dtype("<u4")
"""Dtype of masks and masked vectors: little-endian unsigned 32-bit."""

_ZERO_IV = bytes(16)
_CHUNK_BYTES = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK_BYTES)


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` pseudo-random ``uint32`` words.

    The keystream of AES-256-CTR keyed with ``seed`` is generated directly into
    the output buffer in 1 MiB chunks (no intermediate copies). The initial
    counter block is fixed to zero. This is safe because every seed is used for
    exactly one expansion: self-mask seeds are fresh ``os.urandom`` values per
    round, and pairwise seeds are HKDF outputs bound to the run id, the round
    id, the node pair and fresh per-round X25519 keys, so no (key, counter)
    pair ever repeats across different masks.

    Parameters
    ----------
    seed : bytes
        32-byte secret seed (used as the AES-256 key).
    length : int
        Number of ``uint32`` entries to produce (``>= 0``).

    Returns
    -------
    numpy.ndarray
        Writable 1-D array of dtype ``<u4`` (``uint32``) with ``length`` entries;
        the same seed always yields the same array.

    Raises
    ------
    InvalidMessageError
        If ``seed`` is not 32 bytes or ``length`` is negative.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise InvalidMessageError(
            f"mask seed must be {KEY_BYTES} bytes; a mask cannot be derived from it"
        )
    length = int(length)
    if length < 0:
        raise InvalidMessageError(
            f"mask length must be non-negative, got {length}; no mask can be derived"
        )
    nbytes = 4 * length
    # update_into requires len(out) >= len(data) + block_size - 1.
    buf = np.empty(nbytes + 15, dtype=np.uint8)
    out = memoryview(buf)
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_IV)).encryptor()
    zeros = memoryview(_ZERO_CHUNK)
    offset = 0
    while offset < nbytes:
        step = min(_CHUNK_BYTES, nbytes - offset)
        offset += encryptor.update_into(zeros[:step], out[offset:])
    return buf[:nbytes].view(MASK_DTYPE)
