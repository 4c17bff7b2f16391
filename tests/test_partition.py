"""Partitioners: disjoint, complete, seeded; Dirichlet skews labels."""

from __future__ import annotations

import numpy as np
import pytest

from fedseal.common.partition import PartitionError, dirichlet_partition, iid_partition, label_mix


def _check_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_iid_is_balanced_seeded_and_covers():
    parts = iid_partition(103, 10, seed=1)
    _check_exact_cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}
    assert parts == iid_partition(103, 10, seed=1)
    assert parts != iid_partition(103, 10, seed=2)


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    labels = [i % 2 for i in range(2000)]
    skewed = dirichlet_partition(labels, 5, alpha=0.1, seed=0)
    even = dirichlet_partition(labels, 5, alpha=1000.0, seed=0)
    _check_exact_cover(skewed, 2000)
    _check_exact_cover(even, 2000)

    def majority_share(parts):
        mix = np.array(label_mix(labels, parts, 2), dtype=float)
        return float(np.mean(mix.max(axis=1) / mix.sum(axis=1)))

    assert majority_share(skewed) > 0.8
    assert majority_share(even) < 0.6
    assert skewed == dirichlet_partition(labels, 5, alpha=0.1, seed=0)


def test_dirichlet_respects_min_size():
    labels = [i % 3 for i in range(300)]
    parts = dirichlet_partition(labels, 4, alpha=0.3, seed=3, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_errors_say_what_to_change():
    with pytest.raises(PartitionError, match="fewer sites or more data"):
        iid_partition(3, 5, seed=0)
    with pytest.raises(PartitionError, match="alpha must be positive"):
        dirichlet_partition([0, 1], 1, alpha=0, seed=0)
