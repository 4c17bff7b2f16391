"""How much each site's update counts in the mean: never its exact example count.

A site's weight leaves the site (inside the masked vector under secure
aggregation, in the clear without it), and the server learns the sum of the
weights every round. An exact count would let it difference sums across
rounds and recover each site's count. So a weight is either

* ``equal`` (the default): 1 for every site, the plain mean of the updates; or
* ``bucket``: ``2**floor(log2(b / cap))`` for the site's size bucket ``b``
  (:func:`fedseal.common.buckets.size_bucket`, the largest power of two not above
  its count) and ``cap = max-site-examples``, at most 1 and floored at ``1/16``:
  five weights (1, 1/2, 1/4, 1/8, 1/16), each a factor of two wide, so
  differencing reveals at most what the size bucket already says.

The probe's statistics round (round 1, see :mod:`fedseal.common.dp_rule`) is the one
exception: there a site's weight is its *differentially private* estimate of
its example count over the same public cap, drawn from the very Gaussian
release that carries its feature mean (:func:`fedseal.client.probe.release_statistics`),
so it costs no privacy beyond that release. The weighted mean is then the
pooled mean, sum of noisy sums over sum of noisy counts, in which a small
site's noise weighs as little as its data (an equal-weight average of the
sites' noisy means lets a small site's noise swamp it).
"""

from __future__ import annotations

import math

from fedseal.common.buckets import check_bucket
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import stats_rounds

SMALLEST_BUCKET = 1 / 16
BUCKETS = tuple(2.0**-j for j in range(5))  # 1, 1/2, 1/4, 1/8, 1/16


def site_weight(bucket: int, cfg: FedConfig) -> float:
    """The weight of a site of size bucket ``bucket`` under ``cfg.weighting``.

    Raises
    ------
    ValueError
        If ``bucket`` is not a size bucket (an exact count is refused).
    """
    check_bucket(bucket)
    if cfg.weighting == "equal":
        return 1.0
    ratio = min(bucket, cfg.max_site_examples) / cfg.max_site_examples
    return max(SMALLEST_BUCKET, 2.0 ** math.floor(math.log2(ratio)))


def stats_weight(count: float, cfg: FedConfig) -> float:
    """The statistics round's weight of a site whose (DP) count estimate is ``count``.

    ``count / max-site-examples``, within ``[1 / max-site-examples, 1]``: a
    site above the cap counts as the cap.
    """
    return min(1.0, max(1.0, count) / cfg.max_site_examples)


def weight_range(cfg: FedConfig, server_round: int) -> tuple[float, float]:
    """Smallest and largest weight one site can have in round ``server_round`` of run ``cfg``.

    The server holds every round's weights to it, whether it sees them one by
    one (secure aggregation off) or only their sum.
    """
    if server_round <= stats_rounds(cfg):
        return (1.0 / cfg.max_site_examples, 1.0)
    return (1.0, 1.0) if cfg.weighting == "equal" else (SMALLEST_BUCKET, 1.0)
