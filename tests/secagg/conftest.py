"""Shared helpers for the SecAgg+ tests.

Test data is generated with numpy's ``default_rng`` (test inputs only); every
secret inside the protocol comes from the OS CSPRNG. Sites sign with Ed25519
here (fast); the P-384 keys deployments use are exercised in the identity and
Flower-level tests.
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

from fedseal.common.secagg import (  # noqa: E402
    ClientState,
    RoundContext,
    ServerState,
    ShareMessage,
    generate_key_pair,
    make_identities,
)


def node_ids(n: int, seed: int = 0) -> list[int]:
    """``n`` distinct random node ids, some above 2**63 like Flower's."""
    rng = np.random.default_rng(seed)
    ids = sorted({int(v) for v in rng.integers(1, 2**64 - 1, size=n, dtype=np.uint64)})
    assert len(ids) == n
    return ids


@dataclass
class Round:
    """One SecAgg+ round with honest sites, driven stage by stage by the test (the server)."""

    ctx: RoundContext
    server: ServerState
    clients: dict[int, ClientState]
    vectors: dict[int, np.ndarray]
    identities: dict
    roster: object
    bundles: dict = field(default_factory=dict)
    routed: dict = field(default_factory=dict)
    view: bytes = b""
    relays: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return sorted(self.clients)

    def adverts(self) -> dict[int, bytes]:
        return {i: c.advertise_keys().encode(self.ctx.digest) for i, c in self.clients.items()}

    def advertise(self, adverts: dict[int, bytes] | None = None) -> dict:
        self.bundles, rejected = self.server.collect_adverts(adverts or self.adverts())
        return rejected

    def share_replies(self, nodes=None) -> dict[int, tuple[bytes, dict[int, bytes]]]:
        out = {}
        for i in nodes if nodes is not None else self.bundles:
            message, cts = self.clients[i].share_keys(self.bundles[i])
            out[i] = (message.encode(self.ctx.digest), cts)
        return out

    def share(self, replies=None) -> dict:
        self.routed, rejected = self.server.collect_shares(
            replies if replies is not None else self.share_replies()
        )
        return rejected

    def opened(self, node: int, routed: dict | None = None) -> dict:
        routed = self.routed if routed is None else routed
        return {s: (ShareMessage.decode(m)[0], ct) for s, (m, ct) in routed[node].items()}

    def masked_replies(self, nodes=None) -> dict:
        return {
            i: self.clients[i].masked_input(self.opened(i), self.vectors[i])
            for i in (nodes if nodes is not None else self.routed)
        }

    def mask(self, replies=None) -> dict:
        self.view, rejected = self.server.collect_masked(
            replies if replies is not None else self.masked_replies()
        )
        return rejected

    def sign(self, nodes=None) -> dict:
        sigs = {
            i: self.clients[i].sign_view(self.view)
            for i in (nodes if nodes is not None else self.server.survivors)
        }
        self.relays, rejected = self.server.collect_signatures(sigs)
        return rejected

    def unmask_replies(self, nodes=None) -> dict:
        return {
            i: self.clients[i].unmask(self.view, self.relays[i])
            for i in (nodes if nodes is not None else self.relays)
        }

    def finalize(self, replies=None):
        return self.server.finalize(replies if replies is not None else self.unmask_replies())

    def expected(self, nodes) -> np.ndarray:
        total = np.zeros_like(next(iter(self.vectors.values())))
        for i in nodes:
            total += self.vectors[i]
        return total


def make_round(
    n: int,
    *,
    k: int,
    threshold: int,
    length: int = 32,
    run_id: int = 11,
    round_id: int = 3,
    seed: int = 0,
    min_survivors: int = 1,
    kind: str = "ed25519",
) -> Round:
    """Sites and a server for one round (nothing sent yet)."""
    ids = node_ids(n, seed)
    identities, roster = make_identities(ids, kind)
    challenge_sk, challenge_pk = generate_key_pair()
    ctx = RoundContext(run_id, round_id, ids, k, threshold, challenge_pk)
    server = ServerState(ctx, challenge_private=challenge_sk, vector_length=length)
    clients = {
        i: ClientState(i, ctx, identity=identities[i], roster=roster, min_survivors=min_survivors)
        for i in ids
    }
    rng = np.random.default_rng(seed + 1)
    vectors = {i: rng.integers(0, 2**32, size=length, dtype=np.uint32) for i in ids}
    return Round(ctx, server, clients, vectors, identities, roster)


def staged(n: int, *, k: int, threshold: int, **kw) -> Round:
    """A round driven honestly through key sharing (stages 0-1)."""
    r = make_round(n, k=k, threshold=threshold, **kw)
    assert r.advertise() == {}
    assert r.share() == {}
    return r


@pytest.fixture
def staged_round():
    """Factory fixture: ``staged_round(n, k=..., threshold=...)`` -> Round after stage 1."""
    return staged
