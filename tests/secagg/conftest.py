"""Shared helpers for the SecAgg+ tests.

Test data is generated with numpy's ``default_rng`` (test inputs only); every
secret inside the protocol comes from the OS CSPRNG.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from common.secagg import ClientState, ServerState  # noqa: E402


@dataclass
class StagedRound:
    """A round driven up to the point where masked inputs can be submitted."""

    server: ServerState
    clients: dict[int, ClientState]
    bundles: dict[int, dict[int, tuple[bytes, bytes]]]
    shares: dict[int, dict[int, bytes]]
    routed: dict[int, dict[int, bytes]]
    vectors: dict[int, np.ndarray] = field(default_factory=dict)


def stage_round(
    n: int,
    *,
    k: int,
    threshold: int,
    length: int = 32,
    run_id: int = 11,
    round_id: int = 3,
    seed: int = 0,
) -> StagedRound:
    """Create n clients and a server and run stages 0-1 (no dropouts)."""
    rng = np.random.default_rng(seed)
    ids = sorted({int(v) for v in rng.integers(1, 2**62, size=n)})
    assert len(ids) == n
    server = ServerState(
        ids, threshold=threshold, k=k, vector_length=length, run_id=run_id, round_id=round_id
    )
    clients = {
        i: ClientState(i, ids, threshold=threshold, k=k, run_id=run_id, round_id=round_id)
        for i in ids
    }
    adverts = {i: c.advertise_keys() for i, c in clients.items()}
    bundles = server.broadcast_keys(adverts)
    shares = {i: clients[i].share_keys(bundles[i]) for i in bundles}
    routed = server.route_shares(shares)
    vectors = {i: rng.integers(0, 2**32, size=length, dtype=np.uint32) for i in ids}
    return StagedRound(server, clients, bundles, shares, routed, vectors)


@pytest.fixture
def staged_round():
    """Factory fixture: ``staged_round(n, k=..., threshold=...)`` -> StagedRound."""
    return stage_round
