"""Fixed-point encoding into Z_2^32."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.common.secagg import (
    ConfigError,
    InvalidMessageError,
    InvalidUpdateError,
    QuantConfig,
    dequantize_sum,
    quantize,
    to_fixed_point,
)


def _ring_sum(vs: list[np.ndarray]) -> np.ndarray:
    out = np.zeros_like(vs[0])
    for v in vs:
        out += v
    return out


def test_scale_and_headroom() -> None:
    cfg = QuantConfig(clip=1.0, max_clients=100)
    assert cfg.max_level == (2**31 - 1) // 100
    assert cfg.scale == pytest.approx(cfg.max_level / 1.0)
    assert cfg.max_clients * cfg.max_level <= 2**31 - 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rejected(bad: float) -> None:
    x = np.array([0.1, bad, 0.2], dtype=np.float32)
    with pytest.raises(InvalidUpdateError, match="update contains NaN/inf"):
        quantize(x, QuantConfig(clip=1.0, max_clients=4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0, "max_clients": 2},
        {"clip": -1.0, "max_clients": 2},
        {"clip": float("inf"), "max_clients": 2},
        {"clip": float("nan"), "max_clients": 2},
        {"clip": 1.0, "max_clients": 0},
        {"clip": 1.0, "max_clients": 2, "bits": 33},
        {"clip": 1.0, "max_clients": 2, "bits": 1},
    ],
)
def test_invalid_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        QuantConfig(**kwargs)


def test_scale_below_one_is_rejected_with_advice() -> None:
    with pytest.raises(ConfigError, match="lower max_clients or clip"):
        QuantConfig(clip=1e7, max_clients=1000)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roundtrip_error_within_half_step(dtype) -> None:
    cfg = QuantConfig(clip=0.5, max_clients=50)
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, size=10_000).astype(dtype)
    x[:2] = [-0.5, 0.5]
    back = dequantize_sum(quantize(x, cfg), cfg)
    assert back.dtype == np.float64
    err = np.abs(back - x.astype(np.float64))
    assert err.max() <= 0.5 / cfg.scale * (1 + 1e-9)


def test_values_are_clipped() -> None:
    cfg = QuantConfig(clip=1.0, max_clients=3)
    q = quantize(np.array([5.0, -7.0, 0.0]), cfg)
    assert q.dtype == np.uint32
    np.testing.assert_allclose(dequantize_sum(q, cfg), [1.0, -1.0, 0.0], atol=1 / cfg.scale)


@pytest.mark.parametrize("bits", [32, 16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_sum_does_not_wrap(bits: int, sign: float) -> None:
    cfg = QuantConfig(clip=2.0, max_clients=37, bits=bits)
    x = np.full(8, sign * cfg.clip)
    s = _ring_sum([quantize(x, cfg) for _ in range(cfg.max_clients)])
    back = dequantize_sum(s, cfg)
    assert np.all(np.sign(back) == sign)
    np.testing.assert_allclose(back, sign * cfg.clip * cfg.max_clients, rtol=1e-9)


def test_dequantize_rejects_non_uint32() -> None:
    with pytest.raises(InvalidMessageError, match="uint32"):
        dequantize_sum(np.zeros(3, dtype=np.int64), QuantConfig(clip=1.0, max_clients=2))


@settings(max_examples=25, deadline=None)
@given(
    clip=st.floats(0.01, 100.0),
    max_clients=st.integers(1, 1000),
    bits=st.sampled_from([32, 24, 20]),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_decodes_exactly(clip: float, max_clients: int, bits: int, n: int, seed: int) -> None:
    try:
        cfg = QuantConfig(clip=clip, max_clients=max_clients, bits=bits)
    except ConfigError:
        return
    n = min(n, max_clients)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1.5 * clip, 1.5 * clip, size=64) for _ in range(n)]
    ring = _ring_sum([quantize(x, cfg) for x in xs])
    exact = np.sum([to_fixed_point(x, cfg) for x in xs], axis=0)
    assert np.array_equal(dequantize_sum(ring, cfg), exact / cfg.scale)
