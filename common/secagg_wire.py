"""How secure-aggregation messages travel in Flower records, and the update encoding.

One vocabulary of record keys and message types, shared by the server
(:mod:`fedseal.server.secagg`) and the sites (:mod:`fedseal.client.secagg`). The protocol in
:mod:`fedseal.common.secagg` speaks canonical ``bytes`` encodings and dicts keyed by
node id; node ids use all 64 unsigned bits, so they travel packed big-endian
inside ``bytes`` values. Every reader checks types and lengths and raises
:class:`WireError` on malformed input.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedseal.common.errors import FedsealError
from fedseal.common.secagg import (
    QuantConfig,
    default_k,
    default_threshold,
    dequantize_sum,
    quantize,
    validate_parameters,
)
from fedseal.common.secagg.errors import SecAggError
from fedseal.common.secagg.messages import pack_var_table, unpack_var_table
from fedseal.common.secagg.protocol import SHARE_CIPHERTEXT_BYTES

if TYPE_CHECKING:  # config checks its SecAgg+ settings with this module: no import back
    from fedseal.common.config import FedConfig

# Message types of the stages after "train" (ClientApp actions "train.<name>").
SHARE_KEYS = "secagg_share_keys"
MASKED_INPUT = "secagg_masked_input"
CONSISTENCY = "secagg_consistency"
UNMASK = "secagg_unmask"
STAGES = (SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)

# Record names and keys.
RECORD = "secagg"  # ConfigRecord carrying the protocol's fields, both directions
MASKED = "masked"  # ArrayRecord of the masked vector (site -> server, stage 2)
Y = "y"
NODES, K, THRESHOLD, ROUND, CHALLENGE = "nodes", "k", "threshold", "round", "challenge"
ADVERT = "advert"
BUNDLE = "bundle"
SHARES, CIPHERTEXTS = "shares", "ciphertexts"
ROUTED = "routed"
COMPLAINTS = "complaints"
VIEW, SIGNATURE, SIGNATURES = "view", "signature", "signatures"
B_SHARES, SK_SHARES, SEEDS = "b_shares", "sk_shares", "seeds"

SUM_HEADROOM = 2
"""The fixed-point scale leaves room for ``SUM_HEADROOM * n`` clipped vectors, so
a sum that a site garbled (e.g. with a masked vector the protocol cannot
produce) falls outside the honest range with overwhelming probability."""

_ID = struct.Struct(">Q")
_LEN = struct.Struct(">I")
_IDX = struct.Struct(">H")


class WireError(FedsealError, ValueError):
    """A secure-aggregation message is malformed."""

    code = "wire.error"


def field(record: object, key: str, kind: type) -> object:
    """``record[key]``, required to be of ``kind`` (``bytes`` or ``int``)."""
    try:
        value = record[key]  # type: ignore[index]
    except (KeyError, TypeError):
        raise WireError(f"'{key}' is missing") from None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise WireError(f"'{key}' must be an integer, got {type(value).__name__}")
    if kind is bytes and not isinstance(value, bytes):
        raise WireError(f"'{key}' must be bytes, got {type(value).__name__}")
    return value


def pack_ids(ids: list[int]) -> bytes:
    """Node ids as consecutive big-endian uint64."""
    return b"".join(_ID.pack(i) for i in ids)


def unpack_ids(data: object) -> list[int]:
    """Inverse of :func:`pack_ids`."""
    if not isinstance(data, (bytes, bytearray)) or len(data) % _ID.size:
        raise WireError("node-id list has a length that is not a multiple of 8 bytes")
    return [_ID.unpack_from(data, off)[0] for off in range(0, len(data), _ID.size)]


def pack_table(table: Mapping[int, bytes]) -> bytes:
    """``{node_id: payload}`` with equal-length payloads, as one bytes value."""
    widths = {len(v) for v in table.values()}
    if len(widths) > 1:
        raise WireError(f"payloads must have equal length, got {sorted(widths)}")
    width = widths.pop() if widths else 0
    return _LEN.pack(width) + b"".join(_ID.pack(k) + bytes(table[k]) for k in sorted(table))


def unpack_table(data: object, width: int | None = None) -> dict[int, bytes]:
    """Inverse of :func:`pack_table`; with ``width``, every payload must have that length."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _LEN.size:
        raise WireError("table is too short to hold its header")
    (got,) = _LEN.unpack_from(data)
    body = memoryview(data)[_LEN.size :]
    if width is not None and body and got != width:
        raise WireError(f"table entries are {got} bytes, expected {width}")
    entry = _ID.size + got
    if len(body) % entry:
        raise WireError(f"table body of {len(body)} bytes is not a multiple of {entry}")
    out: dict[int, bytes] = {}
    for off in range(0, len(body), entry):
        (node,) = _ID.unpack_from(body, off)
        if node in out:
            raise WireError(f"node {node} appears twice in a table")
        out[node] = bytes(body[off + _ID.size : off + entry])
    return out


def var_table(data: object, what: str) -> dict[int, bytes]:
    """:func:`fedseal.common.secagg.messages.unpack_var_table`, raising :class:`WireError`."""
    try:
        return unpack_var_table(data, what)
    except SecAggError as exc:
        raise WireError(str(exc)) from None


def pack_shares(shares: Mapping[int, tuple[int, bytes]]) -> bytes:
    """``{owner: (shamir_index, share)}`` as a table."""
    return pack_table({k: _IDX.pack(i) + s for k, (i, s) in shares.items()})


def unpack_shares(data: object) -> dict[int, tuple[int, bytes]]:
    """Inverse of :func:`pack_shares`."""
    table = unpack_table(data)
    if any(len(v) <= _IDX.size for v in table.values()):
        raise WireError("a share entry is too short to hold an index and a share")
    return {k: (_IDX.unpack_from(v)[0], v[_IDX.size :]) for k, v in table.items()}


def pack_routed(routed: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """``{sender: (share message, ciphertext)}`` as a variable-length table."""
    return pack_var_table({s: m + ct for s, (m, ct) in routed.items()})


def unpack_routed(data: object) -> dict[int, tuple[bytes, bytes]]:
    """Inverse of :func:`pack_routed`."""
    table = var_table(data, "routed shares")
    if any(len(v) <= SHARE_CIPHERTEXT_BYTES for v in table.values()):
        raise WireError("a routed share entry is too short to hold a ciphertext")
    return {s: (v[:-SHARE_CIPHERTEXT_BYTES], v[-SHARE_CIPHERTEXT_BYTES:]) for s, v in table.items()}


def round_parameters(cfg: FedConfig, n: int) -> tuple[int, int]:
    """(k, threshold) for a round of ``n`` sites: configured, or O(log n) defaults.

    Raises
    ------
    fedseal.common.secagg.ConfigError
        If the configured values break the SecAgg+ rules for ``n`` sites.
    """
    # a validated config holds an int or the word auto (config.AUTO), its only text value
    k = min(default_k(n) if isinstance(cfg.secagg_k, str) else cfg.secagg_k, max(n - 1, 1))
    threshold = default_threshold(k) if isinstance(cfg.secagg_threshold, str) else cfg.secagg_threshold
    validate_parameters(n, k, threshold)
    return k, threshold


def quant_config(n: int, clip: float) -> QuantConfig:
    """Fixed-point encoding for a round of ``n`` sites.

    Entries of ``w * update`` are clipped to ``[-clip, clip]``, the round's bound
    (:func:`fedseal.common.vote.round_clip`);
    the scale leaves ``ceil(log2(SUM_HEADROOM * n))`` bits of headroom in
    Z_2^32, so the sum of ``n`` honest encodings never wraps and fills at most
    half of the range (see :data:`SUM_HEADROOM`).
    """
    return QuantConfig(clip=clip, max_clients=SUM_HEADROOM * n)


def encode_update(flat_weighted_update: np.ndarray, weight: float, n: int, clip: float) -> np.ndarray:
    """Quantise ``[w * update..., w * clip]`` into one uint32 vector.

    The weight rides inside the masked vector (scaled by the clip bound so it
    uses the same fixed-point grid), so the server learns only the sum of the
    weights, never one site's weight.
    """
    quant = quant_config(n, clip)
    vector = np.append(np.asarray(flat_weighted_update, dtype=np.float64), weight * quant.clip)
    return quantize(vector, quant)


class SumRangeError(FedsealError, ValueError):
    """An unmasked sum that honest sites cannot have produced."""

    code = "wire.sum_range"


def decode_sum(
    total: np.ndarray, n: int, survivors: int, weights: tuple[float, float], clip: float
) -> tuple[np.ndarray, float]:
    """Decode a recovered sum and check it against what ``survivors`` sites can have sent.

    Parameters
    ----------
    total : numpy.ndarray
        The uint32 ring sum of ``survivors`` outputs of :func:`encode_update`.
    n : int
        The round's cohort size (fixes the quantisation).
    survivors : int
        Number of sites whose vectors are in ``total``.
    weights : tuple[float, float]
        Smallest and largest weight one site can have
        (:func:`fedseal.common.weights.weight_range`).
    clip : float
        The round's bound, as the sites encoded with (:func:`fedseal.common.vote.round_clip`).

    Returns
    -------
    tuple[numpy.ndarray, float]
        ``(sum of w * update, sum of w)``.

    Raises
    ------
    SumRangeError
        If an entry lies beyond ``survivors`` clipped values, or the weight sum
        beyond what ``survivors`` sites can have sent: some site sent a vector
        the protocol cannot produce (the server cannot tell which).
    """
    quant = quant_config(n, clip)
    values = dequantize_sum(total, quant)
    levels = np.rint(values * quant.scale)
    bound = survivors * quant.max_level
    outside = int(np.count_nonzero(np.abs(levels[:-1]) > bound))
    if outside:
        raise SumRangeError(
            f"{outside} entries of the sum lie beyond {survivors} sites' clipped "
            "updates: a site sent a masked vector the protocol cannot produce"
        )
    lo, hi = (int(np.rint(w * quant.max_level)) for w in weights)
    w_level = int(levels[-1])
    if not survivors * lo <= w_level <= survivors * hi:
        raise SumRangeError(
            f"the weights sum to {w_level / quant.max_level:.6g}, which "
            f"{survivors} sites cannot have sent: a site tampered with its weight"
        )
    return values[:-1], float(values[-1] / quant.clip)
