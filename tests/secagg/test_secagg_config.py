"""SecAgg+ and encoding settings are checked when the run is configured, against every
cohort size the run may meet, so no round fails after sites have spent budget; and the
pieces of the round result that bound one site's influence."""

from __future__ import annotations

import numpy as np
import pytest

from fedseal.common.buckets import size_bucket
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.secagg_wire import SumRangeError, decode_sum, encode_update, quant_config
from fedseal.common.weights import BUCKETS, site_weight, weight_range
from fedseal.server.aggregate import RoundSums


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"secagg_k": 3, "clients": 10}, "odd"),
        ({"secagg_threshold": 5, "clients": 10, "min_clients": 3}, "round of 3 sites"),
        ({"secagg_threshold": 2, "secagg_k": 8, "clients": 10}, "strict majority"),
        ({"update_clip": 5e8, "clients": 10}, "too large to encode 10 sites"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"min_clients": 1}, "at least 2 sites"),
        ({"weighting": "examples"}, "exact example count"),
        ({"weighting": "sizes"}, "weighting must be one of"),
    ],
)
def test_settings_that_would_fail_mid_run_fail_now(settings, match) -> None:
    with pytest.raises(ConfigError, match=match):
        FedConfig(**settings)


def test_settings_valid_for_every_cohort_size_pass() -> None:
    cfg = FedConfig(clients=20, min_clients=5, secagg_k=4, secagg_threshold=3)
    assert cfg.secagg_k == 4
    FedConfig(clients=8, secagg_k=7)  # odd k is fine where it covers every cohort (k >= n-1)...
    with pytest.raises(ConfigError, match="odd"):
        FedConfig(clients=20, secagg_k=7)  # ...which 7 does not for 20 sites
    FedConfig(secagg=False, seed=0, min_clients=1, update_clip=5e8, clients=10)  # no SecAgg


def test_equal_weights_by_default_and_only_coarse_buckets_otherwise() -> None:
    cfg = FedConfig()
    assert cfg.weighting == "equal" and site_weight(size_bucket(7003), cfg) == 1.0
    bucket = cfg.replace(weighting="bucket")
    # the weight depends on the size bucket only (4,096 to 8,191 examples alike)
    assert site_weight(size_bucket(7003), bucket) == site_weight(size_bucket(4096), bucket) == 1 / 16
    assert site_weight(size_bucket(99_999), bucket) == site_weight(size_bucket(65_536), bucket) == 0.5
    assert site_weight(size_bucket(10**9), bucket) == 1.0 and site_weight(1, bucket) == 1 / 16
    assert {site_weight(size_bucket(c), bucket) for c in range(1, 200_000, 997)} <= set(BUCKETS)
    with pytest.raises(ValueError, match="size bucket"):
        site_weight(7003, bucket)  # an exact count is refused
    # round 2: a training round (round 1 is the probe's statistics round)
    assert weight_range(cfg, 2) == (1.0, 1.0) and weight_range(bucket, 2) == (1 / 16, 1.0)


def test_the_weight_sum_is_exact_and_checked_against_the_survivors() -> None:
    cfg = FedConfig(clients=5, weighting="bucket")
    q = quant_config(5, cfg.update_clip)
    xs = [encode_update(np.zeros(3), w, 5, cfg.update_clip) for w in (1.0, 0.5, 1 / 16)]
    total = np.sum(xs, axis=0, dtype=np.uint32)
    _, weight_sum = decode_sum(total, 5, 3, weight_range(cfg, 2), cfg.update_clip)
    assert weight_sum == pytest.approx(1.5625, abs=1 / q.scale)
    with pytest.raises(SumRangeError, match="weights sum"):
        decode_sum(total, 5, 1, weight_range(cfg, 2), cfg.update_clip)  # one site cannot have sent that
    with pytest.raises(SumRangeError, match="weights sum"):
        decode_sum(total, 5, 3, (1.0, 1.0), cfg.update_clip)


def test_the_mean_update_never_leaves_the_clip() -> None:
    sums = RoundSums(update_sum={"a": np.array([10.0, -10.0, 0.5])}, weight_sum=1e-6, clip=1.0)
    np.testing.assert_array_equal(sums.mean_update()["a"], [1.0, -1.0, 1.0])
    assert RoundSums(update_sum={"a": np.ones(1)}, weight_sum=float("nan")).mean_update() is None


def test_auto_k_and_threshold_follow_each_rounds_cohort() -> None:
    from fedseal.common.secagg import default_k, default_threshold
    from fedseal.common.secagg_wire import round_parameters

    cfg = FedConfig(clients=20, min_clients=5)
    assert cfg.secagg_k == cfg.secagg_threshold == "auto"
    for n in (5, 8, 20):
        k = min(default_k(n), n - 1)
        assert round_parameters(cfg, n) == (k, default_threshold(k))
    fixed = FedConfig(clients=20, min_clients=5, secagg_k=4)  # a number is kept; t still auto
    assert round_parameters(fixed, 20) == (4, default_threshold(4))
