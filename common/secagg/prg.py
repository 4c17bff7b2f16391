"""Pseudo-random mask expansion over the ring Z_{2^32}.

A 32-byte seed is used as an AES-256 key in CTR mode with a fixed all-zero
initial counter block; the keystream (the encryption of zero bytes) is read as
little-endian ``uint32`` words. Masks are added and subtracted with ordinary
``uint32`` numpy arithmetic, which wraps modulo ``2**32``.

:func:`apply_masks` adds and subtracts many masks in one pass over the vector,
a cache-sized block at a time, without ever holding a whole mask: masking is
memory-bound, and k + 1 full-length masks would cost k + 1 extra passes over
memory (and page faults for k + 1 fresh allocations).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .crypto import KEY_BYTES
from .errors import InvalidMessageError

__all__ = ["apply_masks", "expand_mask", "MASK_DTYPE"]

MASK_DTYPE = np.dtype("<u4")
"""Dtype of masks and masked vectors: little-endian unsigned 32-bit."""

_ZERO_IV = bytes(16)
_CHUNK_BYTES = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK_BYTES)
_BLOCK_WORDS = 1 << 17  # apply_masks' block: 512 KiB, within a core's L2 cache


def _check_seed(seed: object) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise InvalidMessageError(f"mask seed must be {KEY_BYTES} bytes; a mask cannot be derived from it")
    return bytes(seed)


def _keystream(seed: bytes):
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


def apply_masks(vector: np.ndarray, masks: list[tuple[bytes, int]]) -> None:
    """Add ``sign * expand_mask(seed, len(vector))`` for every ``(seed, sign)``, in place.

    The result equals adding and subtracting the expanded masks one after the
    other (mod ``2**32``), but the keystreams are generated block by block into
    one small buffer and folded into the vector while it is in cache.

    Parameters
    ----------
    vector : numpy.ndarray
        Writable 1-D ``uint32`` array.
    masks : list[tuple[bytes, int]]
        ``(32-byte seed, +1 or -1)`` pairs.

    Raises
    ------
    InvalidMessageError
        If a seed is not 32 bytes, a sign is not +1 or -1, or ``vector`` is not
        a 1-D ``uint32`` array.
    """
    if not isinstance(vector, np.ndarray) or vector.dtype != MASK_DTYPE or vector.ndim != 1:
        raise InvalidMessageError("masks apply only to a 1-D uint32 vector")
    streams = []
    for seed, sign in masks:
        if sign not in (1, -1):
            raise InvalidMessageError(f"a mask is added (+1) or subtracted (-1), not {sign!r}")
        streams.append((_keystream(_check_seed(seed)), np.add if sign == 1 else np.subtract))
    buf = np.empty(4 * _BLOCK_WORDS + 15, dtype=np.uint8)  # update_into's block_size - 1 slack
    out, words = memoryview(buf), buf[: 4 * _BLOCK_WORDS].view(MASK_DTYPE)  # type: ignore[arg-type]  # numpy: a buffer (stub predates PEP 688)
    zeros = memoryview(_ZERO_CHUNK)
    for start in range(0, vector.shape[0], _BLOCK_WORDS):
        block = vector[start : start + _BLOCK_WORDS]
        count = block.shape[0]
        for stream, op in streams:
            stream.update_into(zeros[: 4 * count], out)
            op(block, words[:count], out=block)


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
    seed = _check_seed(seed)
    length = int(length)
    if length < 0:
        raise InvalidMessageError(f"mask length must be non-negative, got {length}; no mask can be derived")
    nbytes = 4 * length
    # update_into requires len(out) >= len(data) + block_size - 1.
    buf = np.empty(nbytes + 15, dtype=np.uint8)
    out = memoryview(buf)  # type: ignore[arg-type]  # numpy: a buffer (stub predates PEP 688)
    encryptor = _keystream(seed)
    zeros = memoryview(_ZERO_CHUNK)
    offset = 0
    while offset < nbytes:
        step = min(_CHUNK_BYTES, nbytes - offset)
        offset += encryptor.update_into(zeros[:step], out[offset:])
    return buf[:nbytes].view(MASK_DTYPE)
