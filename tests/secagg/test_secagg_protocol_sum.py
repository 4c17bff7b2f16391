"""End-to-end correctness of SecAgg+ rounds, with dropouts at every stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedseal.common.secagg import (
    DROP_STAGES,
    ProtocolAbort,
    QuantConfig,
    dequantize_sum,
    neighbours,
    quantize,
    run_round,
    simulate_round,
    to_fixed_point,
)


def _inputs(n: int, length: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = sorted({int(v) for v in rng.integers(0, 2**64, size=n, dtype=np.uint64)})
    assert len(ids) == n
    return {i: rng.integers(0, 2**32, size=length, dtype=np.uint32) for i in ids}


def _plain_sum(vectors: dict[int, np.ndarray], nodes: list[int]) -> np.ndarray:
    total = np.zeros_like(next(iter(vectors.values())))
    for i in nodes:
        total += vectors[i]
    return total


def _oracle(ids: list[int], k: int, t: int, drops: dict[int, str]) -> list[int] | None:
    """Independent model of who survives; None if the round must abort.

    Mirrors the protocol's rules: a site stays in only while ``t`` of its share
    holders (itself and the neighbours it dealt to) are in; a site reveals only
    if ``t`` sites of each affected neighbourhood signed the survivor view; a
    dropped site's masks go with its rebuilt key or the survivors' own seeds.
    """
    graph = neighbours(ids, k)

    def prune(alive: set[int], holders) -> set[int]:
        while True:
            bad = {i for i in alive if len(({i} | holders(i)) & alive) < t}
            if not bad:
                return alive
            alive -= bad

    u1 = prune({i for i in ids if drops.get(i) != "advertise"}, lambda i: set(graph[i]))
    dealt = {i: set(graph[i]) & u1 for i in u1}
    u2 = prune({i for i in u1 if drops.get(i) != "share"}, dealt.__getitem__)
    u3 = prune({i for i in u2 if drops.get(i) != "masked"}, dealt.__getitem__)
    drop = u2 - u3
    signers = {i for i in u3 if drops.get(i) != "consistency"}
    if min(len(u1), len(u2), len(u3), len(signers)) < t:
        return None

    def quorum(w: int) -> bool:
        return len(signers & ({w} | set(graph[w]))) >= t

    masking = {i: set(graph[i]) & u2 for i in u2}
    answer = {i for i in signers if drops.get(i) != "unmask" and all(quorum(w) for w in {i} | masking[i])}
    for i in u3:  # self-mask seeds: t answering holders
        if len(answer & ({i} | masking[i])) < t:
            return None
    for j in drop:  # masks with dropped sites: rebuilt key, or the survivor's own seed
        key = len(answer & masking[j]) >= t
        if not key and any(i not in answer for i in masking[j] & u3):
            return None
    return sorted(u3)


@pytest.mark.parametrize(
    "n,k,t",
    [(3, 2, 2), (3, 2, 3), (5, 4, 3), (5, 2, 2), (10, 4, 3), (10, 9, 6), (20, 4, 3), (20, 6, 5)],
)
def test_exact_sum_without_dropouts(n: int, k: int, t: int) -> None:
    vectors = _inputs(n, 257, seed=n * 100 + k)
    result = run_round(vectors, threshold=t, k=k, run_id=5, round_id=1)
    assert result.survivors == sorted(vectors) and result.dropped == []
    assert result.aggregate.dtype == np.uint32
    assert np.array_equal(result.aggregate, _plain_sum(vectors, sorted(vectors)))


@pytest.mark.parametrize(
    "n,k,t,drops",
    [
        # one dropout at each stage, spread out on the ring
        (5, 4, 3, {0: "advertise"}),
        (5, 4, 3, {1: "share"}),
        (5, 4, 3, {2: "masked"}),
        (5, 4, 3, {3: "unmask"}),
        (5, 4, 3, {0: "masked", 3: "unmask"}),
        (10, 4, 3, {0: "advertise", 3: "share", 6: "masked"}),
        (12, 4, 3, {0: "advertise", 3: "share", 6: "masked", 9: "unmask"}),
        (10, 9, 6, {1: "advertise", 4: "share", 7: "masked"}),
        (10, 9, 6, {1: "masked", 4: "masked", 7: "unmask"}),
        (20, 6, 5, {0: "masked", 5: "unmask", 10: "share", 15: "advertise"}),
        (20, 10, 7, {0: "masked", 1: "masked", 2: "unmask"}),
        (10, 9, 6, {1: "consistency", 4: "unmask"}),
        (20, 6, 5, {0: "consistency", 10: "masked"}),
    ],
)
def test_exact_sum_with_dropouts(n: int, k: int, t: int, drops: dict[int, str]) -> None:
    vectors = _inputs(n, 64, seed=n + k + len(drops))
    ids = sorted(vectors)
    drop_at = {ids[p]: stage for p, stage in drops.items()}
    expected = _oracle(ids, k, t, drop_at)
    assert expected is not None, "test case should be recoverable"
    result = run_round(vectors, threshold=t, k=k, drop_at=drop_at)
    assert result.survivors == expected
    assert set(result.dropped) == {i for i, s in drop_at.items() if s == "masked"}
    # nodes dropping during the consistency check or unmask are still included
    assert {i for i, s in drop_at.items() if s in ("consistency", "unmask")} <= set(result.survivors)
    assert np.array_equal(result.aggregate, _plain_sum(vectors, expected))


@pytest.mark.parametrize("stage", DROP_STAGES)
def test_below_threshold_aborts(stage: str) -> None:
    vectors = _inputs(5, 16, seed=3)
    ids = sorted(vectors)
    drop_at = {i: stage for i in ids[:3]}  # 2 left, threshold 3
    with pytest.raises(ProtocolAbort, match=r"only \d+ .*threshold is 3") as info:
        simulate_round(vectors, threshold=3, k=4, drop_at=drop_at)
    assert "only 2 " in str(info.value) or "2 answered" in str(info.value)


def test_too_few_shares_for_one_node_aborts() -> None:
    # node 5 drops before masking; 3 of its 4 neighbours vanish at unmask:
    # enough survivors overall (8 >= 3), but some node has only 1-2 < 3 shares
    vectors = _inputs(12, 16, seed=4)
    ids = sorted(vectors)
    drop_at = {ids[5]: "masked", ids[3]: "unmask", ids[4]: "unmask", ids[6]: "unmask"}
    with pytest.raises(ProtocolAbort, match=r"only [12] .*shares of .*node"):
        simulate_round(vectors, threshold=3, k=4, drop_at=drop_at)


def test_defaults_and_quantized_end_to_end() -> None:
    rng = np.random.default_rng(9)
    ids = [3, 17, 2**64 - 1, 0, 99, 1234, 7, 8]
    cfg = QuantConfig(clip=1.0, max_clients=len(ids))
    updates = {i: rng.normal(0.0, 0.5, size=500) for i in ids}
    encoded = {i: quantize(u, cfg) for i, u in updates.items()}
    drop_at = {ids[2]: "masked"}
    result = run_round(encoded, drop_at=drop_at, run_id=2**64 - 1, round_id=12)
    assert result.k == 6 and result.threshold == 5  # default_k(8) = 6, default_threshold(6) = 5
    included = [i for i in ids if i != ids[2]]
    decoded = dequantize_sum(result.aggregate, cfg)
    exact = np.sum([to_fixed_point(updates[i], cfg) for i in included], axis=0) / cfg.scale
    assert np.array_equal(decoded, exact)
    np.testing.assert_allclose(
        decoded,
        np.sum([np.clip(updates[i], -1, 1) for i in included], axis=0),
        atol=len(included) * 0.5 / cfg.scale + 1e-12,
    )


@settings(max_examples=25, deadline=None)
@given(
    ids=st.sets(st.integers(0, 2**64 - 1), min_size=2, max_size=9),
    data=st.data(),
)
def test_sum_property_with_random_dropouts(ids: set[int], data: st.DataObject) -> None:
    order = sorted(ids)
    n = len(order)
    k = data.draw(st.sampled_from(sorted({n - 1, *range(2, n - 1, 2)})), label="k")
    k_eff = min(k, n - 1)
    t = data.draw(st.integers((k_eff + 1) // 2 + 1, k_eff + 1), label="t")  # 2t > k+1
    # half of the examples stay within the per-neighbourhood tolerance k+1-t
    max_drops = k_eff + 1 - t if data.draw(st.booleans(), label="tolerable") else n
    dropping = data.draw(st.lists(st.sampled_from(order), max_size=max_drops, unique=True))
    drop_at = {i: data.draw(st.sampled_from(DROP_STAGES)) for i in dropping}
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    vectors = {i: rng.integers(0, 2**32, size=24, dtype=np.uint32) for i in order}
    expected = _oracle(order, k, t, drop_at)
    event("aborts" if expected is None else "recovers")
    if expected is None:
        with pytest.raises(ProtocolAbort):
            run_round(vectors, threshold=t, k=k, drop_at=drop_at, round_id=seed)
        return
    result = run_round(vectors, threshold=t, k=k, drop_at=drop_at, round_id=seed)
    assert result.survivors == expected
    assert np.array_equal(result.aggregate, _plain_sum(vectors, expected))
