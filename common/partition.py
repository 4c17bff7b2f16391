"""Splitting one labelled dataset across simulated sites.

Both partitioners are seeded and return disjoint index lists that together
cover the data set; every site gets at least one example.
"""

from __future__ import annotations

import numpy as np

from fedseal.common.errors import FedsealError


class PartitionError(FedsealError, ValueError):
    """The data cannot be split as asked."""

    code = "partition.error"


def iid_partition(num_examples: int, num_sites: int, seed: int) -> list[list[int]]:
    """Shuffle the indices and deal them into ``num_sites`` near-equal parts."""
    if num_sites < 1:
        raise PartitionError(f"need at least one site, got {num_sites}")
    if num_examples < num_sites:
        raise PartitionError(
            f"{num_examples} examples cannot be split across {num_sites} sites; use fewer sites or more data"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: list[int], num_sites: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label-skewed split: each label's examples are shared out by Dirichlet(alpha).

    Small ``alpha`` (e.g. 0.1) gives each site few labels; large ``alpha``
    approaches IID. Draws are repeated (same seed stream) until every site holds
    at least ``min_size`` examples.
    """
    if num_sites < 1:
        raise PartitionError(f"need at least one site, got {num_sites}")
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    if len(labels) < num_sites * min_size:
        raise PartitionError(f"{len(labels)} examples cannot give {num_sites} sites {min_size} each")
    rng = np.random.default_rng(seed)
    label_arr = np.asarray(labels)
    classes = np.unique(label_arr)
    for _attempt in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = np.flatnonzero(label_arr == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise PartitionError(
        f"Dirichlet(alpha={alpha}) left a site with fewer than {min_size} examples in 1000 "
        "draws; raise alpha or use fewer sites"
    )


def label_mix(labels: list[int], parts: list[list[int]], num_labels: int) -> list[list[int]]:
    """Per site, the count of each label."""
    arr = np.asarray(labels)
    return [np.bincount(arr[p], minlength=num_labels).tolist() for p in parts]
