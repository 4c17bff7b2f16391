"""Communication graph and parameter rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.common.secagg import (
    ConfigError,
    InvalidMessageError,
    default_k,
    default_threshold,
    neighbours,
    validate_parameters,
)


@settings(max_examples=25, deadline=None)
@given(
    ids=st.sets(st.integers(0, 2**64 - 1), min_size=2, max_size=30),
    half=st.integers(1, 15),
)
def test_ring_graph_properties(ids: set[int], half: int) -> None:
    n, k = len(ids), 2 * half
    graph = neighbours(list(ids), k)
    assert graph == neighbours(sorted(ids, reverse=True), k)  # order independent
    assert set(graph) == ids
    for node, nbrs in graph.items():
        assert node not in nbrs and nbrs == sorted(set(nbrs))
        assert len(nbrs) == min(k, n - 1)
        for j in nbrs:
            assert node in graph[j]


def test_ring_neighbours_are_nearest_on_sorted_ring() -> None:
    ids = [50, 10, 40, 20, 30, 60]
    assert neighbours(ids, 2) == {
        10: [20, 60],
        20: [10, 30],
        30: [20, 40],
        40: [30, 50],
        50: [40, 60],
        60: [10, 50],
    }
    assert neighbours(ids, 5)[10] == [20, 30, 40, 50, 60]  # complete graph: SecAgg


def test_graph_errors() -> None:
    with pytest.raises(ConfigError, match="even"):
        neighbours(range(10), 3)
    with pytest.raises(InvalidMessageError, match="duplicates"):
        neighbours([1, 2, 2], 2)
    with pytest.raises(InvalidMessageError):
        neighbours([1, 2**64], 1)


@pytest.mark.parametrize(
    "n,k",
    [(1, 0), (2, 1), (3, 2), (5, 4), (7, 6), (8, 6), (9, 8), (10, 8), (20, 10), (100, 14), (1000, 20)],
)
def test_default_k(n: int, k: int) -> None:
    assert default_k(n) == k


@pytest.mark.parametrize(
    "k,t", [(0, 1), (1, 2), (2, 3), (3, 3), (4, 4), (5, 4), (6, 5), (8, 6), (10, 7), (14, 10)]
)
def test_default_threshold(k: int, t: int) -> None:
    assert default_threshold(k) == t


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 10, 20, 64, 100, 1000])
def test_defaults_satisfy_rules(n: int) -> None:
    k = default_k(n)
    t = default_threshold(min(k, n - 1))
    assert validate_parameters(n, k, t) == min(k, n - 1)
    assert 2 * t > min(k, n - 1) + 1
    if n > 1:  # one colluding site, a site's default max-colluders, cannot unmask anyone
        assert 2 * t - min(k, n - 1) - 1 >= 2


def test_validate_parameters_rejects_insecure_threshold() -> None:
    with pytest.raises(ConfigError, match="strict majority"):
        validate_parameters(10, 4, 2)  # 2t = 4 <= k+1 = 5
    with pytest.raises(ConfigError, match=r"\[1, k\+1=5\]"):
        validate_parameters(10, 4, 6)
    with pytest.raises(ConfigError, match="no neighbours"):
        validate_parameters(5, 0, 1)
    assert validate_parameters(10, 4, 3) == 4
    assert validate_parameters(5, 100, 3) == 4
