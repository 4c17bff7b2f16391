"""How secure-aggregation messages travel in Flower records.

The protocol in :mod:`common.secagg` speaks dicts keyed by node id. Flower
records key by string and store integers as signed 64-bit, while node ids use
all 64 unsigned bits, so ids travel packed big-endian inside ``bytes`` values.
Every decoder checks lengths and raises :class:`WireError` on malformed input.
"""

from __future__ import annotations

import struct
from typing import Mapping

import numpy as np

from common.config import FedConfig
from common.secagg import QuantConfig, default_k, default_threshold, dequantize_sum, quantize

_ID = struct.Struct(">Q")
_LEN = struct.Struct(">I")
_IDX = struct.Struct(">H")

# Message types of the stages after "train" (ClientApp actions "train.<name>").
SHARE_KEYS = "secagg_share_keys"
MASKED_INPUT = "secagg_masked_input"
UNMASK = "secagg_unmask"


class WireError(ValueError):
    """A secure-aggregation message is malformed."""


def pack_ids(ids: list[int]) -> bytes:
    """Node ids as consecutive big-endian uint64."""
    return b"".join(_ID.pack(i) for i in ids)


def unpack_ids(data: bytes) -> list[int]:
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


def unpack_table(data: bytes) -> dict[int, bytes]:
    """Inverse of :func:`pack_table`."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _LEN.size:
        raise WireError("table is too short to hold its header")
    (width,) = _LEN.unpack_from(data)
    body = memoryview(data)[_LEN.size:]
    entry = _ID.size + width
    if len(body) % entry:
        raise WireError(f"table body of {len(body)} bytes is not a multiple of {entry}")
    out: dict[int, bytes] = {}
    for off in range(0, len(body), entry):
        (node,) = _ID.unpack_from(body, off)
        if node in out:
            raise WireError(f"node {node} appears twice in a table")
        out[node] = bytes(body[off + _ID.size: off + entry])
    return out


def pack_key_bundle(bundle: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """``{node: (c_pk, s_pk)}`` as a table of 64-byte entries."""
    return pack_table({k: c + s for k, (c, s) in bundle.items()})


def unpack_key_bundle(data: bytes) -> dict[int, tuple[bytes, bytes]]:
    """Inverse of :func:`pack_key_bundle`."""
    table = unpack_table(data)
    if any(len(v) != 64 for v in table.values()):
        raise WireError("each key-bundle entry must hold two 32-byte public keys")
    return {k: (v[:32], v[32:]) for k, v in table.items()}


def pack_shares(shares: Mapping[int, tuple[int, bytes]]) -> bytes:
    """``{owner: (shamir_index, share)}`` as a table."""
    return pack_table({k: _IDX.pack(i) + s for k, (i, s) in shares.items()})


def unpack_shares(data: bytes) -> dict[int, tuple[int, bytes]]:
    """Inverse of :func:`pack_shares`."""
    table = unpack_table(data)
    if any(len(v) <= _IDX.size for v in table.values()):
        raise WireError("a share entry is too short to hold an index and a share")
    return {k: (_IDX.unpack_from(v)[0], v[_IDX.size:]) for k, v in table.items()}


def round_parameters(cfg: FedConfig, n: int) -> tuple[int, int]:
    """(k, threshold) for a round of ``n`` sites: configured, or O(log n) defaults."""
    k = cfg.secagg_k or default_k(n)
    k = min(k, max(n - 1, 1))
    threshold = cfg.secagg_threshold or default_threshold(k)
    return k, threshold


def quant_config(cfg: FedConfig, n: int) -> QuantConfig:
    """Fixed-point encoding for a round of ``n`` sites.

    Entries of ``w * update`` are clipped to ``[-update_clip, update_clip]``;
    the scale leaves ``ceil(log2 n)`` bits of headroom in Z_2^32 so the sum of
    ``n`` encodings never wraps (see :class:`common.secagg.QuantConfig`).
    """
    return QuantConfig(clip=cfg.update_clip, max_clients=n)


def encode_update(flat_weighted_update: np.ndarray, weight: float, cfg: FedConfig,
                  n: int) -> np.ndarray:
    """Quantise ``[w * update..., w * clip]`` into one uint32 vector.

    The weight rides inside the masked vector (scaled by the clip bound so it
    uses the same fixed-point grid), so the server learns only the sum of the
    weights, never one site's example count.
    """
    vector = np.append(np.asarray(flat_weighted_update, dtype=np.float64), weight * cfg.update_clip)
    return quantize(vector, quant_config(cfg, n))


def decode_sum(total: np.ndarray, cfg: FedConfig, n: int) -> tuple[np.ndarray, float]:
    """Inverse of :func:`encode_update` applied to a sum: (sum of w*update, sum of w)."""
    values = dequantize_sum(total, quant_config(cfg, n))
    return values[:-1], float(values[-1] / cfg.update_clip)
