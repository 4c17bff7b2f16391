"""How much each site's update counts in the mean: never its exact example count.

A site's weight leaves the site (inside the masked vector under secure
aggregation, in the clear without it), and the server learns the sum of the
weights every round. An exact count would let it difference sums across
rounds and recover each site's count. So a weight is either

* ``equal`` (the default): 1 for every site, the plain mean of the updates; or
* ``bucket``: a coarse public bucket of the count, ``2**floor(log2(c / cap))``
  with ``c = min(count, cap)`` and ``cap = max-site-examples``, floored at
  ``1/16``: five buckets (1, 1/2, 1/4, 1/8, 1/16), each a factor of two wide,
  so differencing reveals at most which bucket a site is in.
"""

from __future__ import annotations

import math

from common.config import FedConfig

WEIGHTINGS = ("equal", "bucket")
SMALLEST_BUCKET = 1 / 16
BUCKETS = tuple(2.0 ** -j for j in range(5))  # 1, 1/2, 1/4, 1/8, 1/16


def site_weight(count: int, cfg: FedConfig) -> float:
    """The weight of a site with ``count`` training examples under ``cfg.weighting``."""
    if cfg.weighting == "equal" or count <= 0:
        return 1.0 if cfg.weighting == "equal" else SMALLEST_BUCKET
    ratio = min(count, cfg.max_site_examples) / cfg.max_site_examples
    return max(SMALLEST_BUCKET, 2.0 ** math.floor(math.log2(ratio)))


def weight_range(cfg: FedConfig) -> tuple[float, float]:
    """Smallest and largest weight one site can have under ``cfg.weighting``."""
    return (1.0, 1.0) if cfg.weighting == "equal" else (SMALLEST_BUCKET, 1.0)
