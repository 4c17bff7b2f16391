"""In-memory driver wiring :class:`ClientState` s and a :class:`ServerState` together.

Used by tests and benchmarks; it performs no I/O and no networking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .client import ClientState
from .errors import ConfigError
from .graph import default_k, default_threshold
from .server import ServerState

__all__ = ["DROP_STAGES", "RoundResult", "run_round", "simulate_round"]

DROP_STAGES = ("advertise", "share", "masked", "unmask")
"""Stages at which a simulated client can drop out.

* ``"advertise"``: never answers ``advertise_keys``;
* ``"share"``: advertised keys but never sends its shares;
* ``"masked"``: shared keys but never sends its masked input;
* ``"unmask"``: sent its masked input but never answers the unmask request
  (its input is still included; its self-mask is rebuilt from others' shares).
"""


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
        Nodes that shared keys but whose masked input was missing (``U2 \\ U3``).
    threshold : int
        Threshold used.
    k : int
        Effective neighbour count used.
    """

    aggregate: np.ndarray
    survivors: list[int]
    dropped: list[int]
    threshold: int
    k: int


def run_round(
    vectors: Mapping[int, np.ndarray],
    threshold: int | None = None,
    k: int | None = None,
    drop_at: Mapping[int, str] | None = None,
    run_id: int = 0,
    round_id: int = 0,
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
        Identifiers bound into every key and ciphertext.

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
        raise ConfigError(
            f"all inputs must be 1-D vectors of the same length, got shapes {sorted(lengths)}"
        )
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

    server = ServerState(
        ids, threshold=threshold, k=k, vector_length=length, run_id=run_id, round_id=round_id
    )
    clients = {
        i: ClientState(i, ids, threshold=threshold, k=k, run_id=run_id, round_id=round_id)
        for i in ids
    }
    adverts = {i: c.advertise_keys() for i, c in clients.items() if drops.get(i) != "advertise"}
    bundles = server.broadcast_keys(adverts)
    shares = {i: clients[i].share_keys(b) for i, b in bundles.items() if drops.get(i) != "share"}
    routed = server.route_shares(shares)
    for i, cts in routed.items():
        if drops.get(i) != "masked":
            server.add_masked_input(i, clients[i].masked_input(cts, vectors[i]))
    survivors, dropped = server.unmask_request()
    replies = {
        i: clients[i].unmask(survivors, dropped) for i in survivors if drops.get(i) != "unmask"
    }
    aggregate = server.finalize(replies)
    return RoundResult(aggregate, survivors, dropped, threshold, server.k)


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
        Shamir threshold (default :func:`~common.secagg.graph.default_threshold`).
    k : int, optional
        Neighbour count (default :func:`~common.secagg.graph.default_k`).
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
