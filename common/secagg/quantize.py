"""Fixed-point encoding of real-valued updates into the ring Z_{2^32}.

Each coordinate ``x`` is clipped to ``[-clip, clip]``, multiplied by ``scale``,
rounded to the nearest integer ``q`` with ``|q| <= max_level`` and stored as the
two's-complement residue ``q mod 2**bits`` in a ``uint32``. Sums of encoded
vectors are computed modulo ``2**32`` (by the masking protocol), reduced modulo
``2**bits`` and read back as signed ``bits``-bit integers.

Headroom
--------
With ``max_level = floor((2**(bits-1) - 1) / max_clients)`` and
``scale = max_level / clip`` every encoded coordinate satisfies
``|q| <= max_level``, hence the sum of at most ``max_clients`` encoded vectors
satisfies ``|sum q_i| <= max_clients * max_level <= 2**(bits-1) - 1`` and never
wraps around the signed range. Decoding that sum is therefore exact:
``dequantize_sum(sum_i quantize(x_i)) == (sum_i q_i) / scale``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, InvalidMessageError, InvalidUpdateError

__all__ = ["QuantConfig", "to_fixed_point", "quantize", "dequantize_sum"]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantConfig:
    """Parameters of the fixed-point encoding.

    Parameters
    ----------
    clip : float
        Per-coordinate bound ``c``; inputs are clipped to ``[-c, c]``. Must be
        positive and finite.
    max_clients : int
        Largest number of encoded vectors that will ever be summed (``n_max``).
        Summing more than this many vectors may wrap around and corrupt the
        aggregate.
    bits : int, optional
        Bit width ``b`` of the signed fixed-point range, ``2 <= b <= 32``
        (default 32). The masking ring is always ``Z_{2^32}``; since ``2**b``
        divides ``2**32``, sums are simply reduced modulo ``2**b`` on decoding.

    Attributes
    ----------
    max_level : int
        Largest encoded magnitude ``floor((2**(bits-1) - 1) / max_clients)``.
    scale : float
        Quantization scale ``max_level / clip`` (levels per unit). The
        resolution is ``1 / scale``; the round-trip error of one coordinate in
        ``[-clip, clip]`` is at most ``0.5 / scale``. The headroom guarantee is
        ``max_clients * max_level <= 2**(bits-1) - 1``.

    Raises
    ------
    ConfigError
        If ``clip`` is not positive and finite, ``max_clients < 1``, ``bits`` is
        outside ``[2, 32]``, or the resulting ``scale`` is below 1 (fewer than
        one quantization level per unit: lower ``max_clients`` or ``clip``).
    """

    clip: float
    max_clients: int
    bits: int = 32
    max_level: int = field(init=False, repr=False)
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        try:
            clip = float(self.clip)
        except (TypeError, ValueError):
            raise ConfigError(f"clip must be a number, got {self.clip!r}; cannot quantize updates") from None
        if not math.isfinite(clip) or clip <= 0:
            raise ConfigError(f"clip must be positive and finite, got {self.clip!r}; cannot quantize updates")
        if not _is_int(self.max_clients) or self.max_clients < 1:
            raise ConfigError(
                f"max_clients must be an integer >= 1, got {self.max_clients!r}; "
                "cannot size the fixed-point headroom"
            )
        if not _is_int(self.bits) or not 2 <= self.bits <= 32:
            raise ConfigError(
                f"bits must be an integer in [2, 32], got {self.bits!r}; the masking ring "
                "is Z_2^32 so at most 32 bits are available"
            )
        object.__setattr__(self, "max_clients", int(self.max_clients))
        object.__setattr__(self, "bits", int(self.bits))
        max_level = ((1 << (self.bits - 1)) - 1) // self.max_clients
        scale = max_level / clip
        if max_level < 1 or scale < 1.0:
            raise ConfigError(
                f"quantization scale would be {scale:.3g} < 1 for clip={clip}, "
                f"max_clients={self.max_clients}, bits={self.bits}: the sum of "
                f"{self.max_clients} clipped updates would not fit in {self.bits} bits "
                "with at least one level per unit; lower max_clients or clip"
            )
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "max_level", max_level)
        object.__setattr__(self, "scale", scale)


def _as_float_array(x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidUpdateError(
            f"update must be a real-valued array, got dtype {arr.dtype}; "
            "it cannot be encoded for secure aggregation"
        )
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InvalidUpdateError(
            f"update contains NaN/inf ({bad} non-finite entries); it cannot be "
            "encoded and this client must not submit it in this round"
        )
    return arr


def to_fixed_point(x: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """Clip, scale and round an update to signed integer levels.

    Parameters
    ----------
    x : numpy.ndarray
        Real-valued update (float32/float64; any shape).
    cfg : QuantConfig
        Encoding parameters.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of the same shape with entries in
        ``[-cfg.max_level, cfg.max_level]``, equal to
        ``rint(clip(x, -c, c) * scale)``.

    Raises
    ------
    InvalidUpdateError
        If ``x`` contains NaN or inf or is not real-valued.
    """
    arr = _as_float_array(x)
    scaled = np.rint(np.clip(arr, -cfg.clip, cfg.clip) * cfg.scale)
    np.clip(scaled, -cfg.max_level, cfg.max_level, out=scaled)
    return scaled.astype(np.int64)


def quantize(x: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """Encode a real-valued update as elements of ``Z_{2^bits}`` stored in ``uint32``.

    Parameters
    ----------
    x : numpy.ndarray
        Real-valued update (float32/float64; any shape).
    cfg : QuantConfig
        Encoding parameters.

    Returns
    -------
    numpy.ndarray
        ``uint32`` array of the same shape holding ``q mod 2**bits`` where
        ``q = to_fixed_point(x, cfg)`` (two's complement for negative levels).

    Raises
    ------
    InvalidUpdateError
        If ``x`` contains NaN or inf ("update contains NaN/inf").
    """
    q = to_fixed_point(x, cfg)
    return (q & ((1 << cfg.bits) - 1)).astype(np.uint32)


def dequantize_sum(s: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """Decode a sum (mod ``2**32``) of quantized vectors back to reals.

    Parameters
    ----------
    s : numpy.ndarray
        ``uint32`` array, the ring sum of at most ``cfg.max_clients`` outputs of
        :func:`quantize`.
    cfg : QuantConfig
        The encoding parameters used by every client.

    Returns
    -------
    numpy.ndarray
        ``float64`` array ``(sum_i q_i) / scale``; exact (no wrap-around) as long
        as at most ``cfg.max_clients`` vectors were summed.

    Raises
    ------
    InvalidMessageError
        If ``s`` is not a ``uint32`` array.
    """
    arr = np.asarray(s)
    if arr.dtype != np.uint32:
        raise InvalidMessageError(
            f"aggregate must have dtype uint32, got {arr.dtype}; it is not a ring "
            "element vector and cannot be decoded"
        )
    if cfg.bits == 32:
        signed = arr.astype("<u4", copy=False).view("<i4").astype(np.float64)
    else:
        mod = 1 << cfg.bits
        v = arr.astype(np.int64) & (mod - 1)
        v[v >= (mod >> 1)] -= mod
        signed = v.astype(np.float64)
    return signed / cfg.scale
