"""In-memory driver wiring :class:`ClientState` s and a :class:`ServerState` together.

Used by tests and benchmarks; it performs no I/O and no networking. Every site
gets a fresh signing identity and all of them form the roster, unless the
caller passes its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .client import ClientState
from .crypto import generate_key_pair
from .errors import ConfigError, ProtocolAbort, UnmaskRefusedError
from .graph import default_k, default_threshold
from .identity import Identity, Roster
from .messages import RoundContext, ShareMessage
from .server import ServerState

__all__ = ["DROP_STAGES", "RoundResult", "make_identities", "run_round", "simulate_round"]

DROP_STAGES = ("advertise", "share", "masked", "consistency", "unmask")
"""Stages at which a simulated client can drop out.

* ``"advertise"``: never answers ``advertise_keys``;
* ``"share"``: advertised keys but never sends its shares;
* ``"masked"``: shared keys but never sends its masked input;
* ``"consistency"``: sent its masked input but never signs the survivor view
  (its input is still included);
* ``"unmask"``: signed the view but never answers the unmask request (its
  input is still included; its self-mask is rebuilt from others' shares).
"""


def make_identities(ids: Sequence[int], kind: str = "p384") -> tuple[dict[int, Identity], Roster]:
    """A fresh signing identity per node and the roster of all of them.

    ``kind`` is ``"p384"`` (what ``fedseal keys`` makes) or ``"ed25519"`` (faster).
    """
    if kind not in ("p384", "ed25519"):
        raise ConfigError(f"identity kind must be p384 or ed25519, got {kind!r}")
    identities = {
        i: Identity(
            ec.generate_private_key(ec.SECP384R1())
            if kind == "p384"
            else ed25519.Ed25519PrivateKey.generate()
        )
        for i in ids
    }
    lines = []
    for i, ident in identities.items():
        key = ident.public_key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        lines.append(f"{key.decode()} node-{i}")
    return identities, Roster.from_text("\n".join(lines))


@dataclass(frozen=True)
class RoundResult:
    """Outcome of a simulated round.

    Attributes
    ----------
    aggregate : numpy.ndarray
        ``uint32`` sum (mod ``2**32``) of the inputs of ``survivors``.
    survivors : list[int]
        Nodes whose masked input was included (``U3``).
    dropped : list[int]
        Nodes that shared keys but whose masked input was missing or discarded
        (``U2 \\ U3``).
    threshold : int
        Threshold used.
    k : int
        Effective neighbour count used.
    rejected : dict[int, str]
        ``node -> reason`` for every reply the server discarded, all stages.
    """

    aggregate: np.ndarray
    survivors: list[int]
    dropped: list[int]
    threshold: int
    k: int
    rejected: dict[int, str]


def run_round(
    vectors: Mapping[int, np.ndarray],
    threshold: int | None = None,
    k: int | None = None,
    drop_at: Mapping[int, str] | None = None,
    run_id: int = 0,
    round_id: int = 0,
    identities: Mapping[int, Identity] | None = None,
    roster: Roster | None = None,
) -> RoundResult:
    """Run one full SecAgg+ round in memory and report who was included.

    Parameters
    ----------
    vectors : Mapping[int, numpy.ndarray]
        ``node_id -> 1-D uint32 input``; all of the same length. The keys are the
        round's participants.
    threshold : int, optional
        Shamir threshold; defaults to ``default_threshold(min(k, n - 1))``.
    k : int, optional
        Neighbour count; defaults to ``default_k(n)``.
    drop_at : Mapping[int, str], optional
        ``node_id -> stage`` (one of :data:`DROP_STAGES`) for simulated dropouts.
    run_id, round_id : int
        Identifiers bound into every key, ciphertext and signature.
    identities, roster : optional
        Each node's signing identity and the roster every node uses; fresh
        Ed25519 identities when omitted.

    Returns
    -------
    RoundResult
        The aggregate and the participant sets.

    Raises
    ------
    ProtocolAbort
        If too few nodes or shares remain at some stage.
    ConfigError
        If parameters or ``drop_at`` are invalid.
    """
    ids = sorted(vectors)
    if not ids:
        raise ConfigError("no participants given; there is nothing to aggregate")
    n = len(ids)
    lengths = {np.asarray(v).shape for v in vectors.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ConfigError(f"all inputs must be 1-D vectors of the same length, got shapes {sorted(lengths)}")
    length = next(iter(lengths))[0]
    k = default_k(n) if k is None else k
    threshold = default_threshold(min(k, n - 1)) if threshold is None else threshold
    drops = dict(drop_at or {})
    for node, stage in drops.items():
        if node not in vectors or stage not in DROP_STAGES:
            raise ConfigError(
                f"drop_at entry {node!r}: {stage!r} is invalid; node must be a participant "
                f"and stage one of {DROP_STAGES}"
            )
    if identities is None or roster is None:
        identities, roster = make_identities(ids, "ed25519")
    challenge_sk, challenge_pk = generate_key_pair()
    ctx = RoundContext(run_id, round_id, tuple(ids), k, threshold, challenge_pk)
    server = ServerState(ctx, challenge_private=challenge_sk, vector_length=length)
    clients = {i: ClientState(i, ctx, identity=identities[i], roster=roster) for i in ids}
    rejected: dict[int, str] = {}

    def answers(nodes: Iterable[int], stage: str, call: Callable[[int], object]) -> dict[int, object]:
        """Each live node's answer; a node that refuses (or aborts) answers nothing."""
        out = {}
        for i in nodes:
            if drops.get(i) == stage:
                continue
            try:
                out[i] = call(i)
            except (ProtocolAbort, UnmaskRefusedError) as exc:
                rejected[i] = f"refused at {stage}: {exc}"
        return out

    def opened(i: int) -> dict[int, tuple[ShareMessage, bytes]]:
        return {s: (ShareMessage.decode(m)[0], ct) for s, (m, ct) in routed[i].items()}

    def shared(i: int) -> tuple[bytes, dict[int, bytes]]:
        message, cts = clients[i].share_keys(bundles[i])
        return message.encode(ctx.digest), cts

    adverts = answers(ids, "advertise", lambda i: clients[i].advertise_keys().encode(ctx.digest))
    bundles, bad = server.collect_adverts(adverts)
    rejected.update(bad)
    routed, bad = server.collect_shares(answers(bundles, "share", shared))
    rejected.update(bad)
    masked = answers(routed, "masked", lambda i: clients[i].masked_input(opened(i), vectors[i]))
    view, bad = server.collect_masked(masked)
    rejected.update(bad)
    signatures = answers(server.survivors, "consistency", lambda i: clients[i].sign_view(view))
    relays, bad = server.collect_signatures(signatures)
    rejected.update(bad)
    replies = answers(relays, "unmask", lambda i: clients[i].unmask(view, relays[i]))
    aggregate, bad = server.finalize(replies)
    rejected.update(bad)
    return RoundResult(aggregate, server.survivors, server.dropped, threshold, server.k, rejected)


def simulate_round(
    vectors: Mapping[int, np.ndarray],
    threshold: int | None = None,
    k: int | None = None,
    drop_at: Mapping[int, str] | None = None,
    run_id: int = 0,
    round_id: int = 0,
) -> np.ndarray:
    """Run one SecAgg+ round in memory and return the aggregate.

    Parameters
    ----------
    vectors : Mapping[int, numpy.ndarray]
        ``node_id -> 1-D uint32 input``.
    threshold : int, optional
        Shamir threshold (default :func:`~fedseal.common.secagg.graph.default_threshold`).
    k : int, optional
        Neighbour count (default :func:`~fedseal.common.secagg.graph.default_k`).
    drop_at : Mapping[int, str], optional
        ``node_id -> stage`` for simulated dropouts (see :data:`DROP_STAGES`).
    run_id, round_id : int
        Identifiers bound into every key and ciphertext.

    Returns
    -------
    numpy.ndarray
        ``uint32`` sum (mod ``2**32``) of the inputs of every node whose masked
        input reached the server. Use :func:`run_round` to also learn that set.

    Raises
    ------
    ProtocolAbort
        If too few nodes or shares remain at some stage.
    """
    return run_round(vectors, threshold, k, drop_at, run_id, round_id).aggregate
