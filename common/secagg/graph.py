"""SecAgg+ communication graph and the rules for choosing ``k`` and ``t``.

SecAgg+ (Bell et al., CCS 2020) replaces the complete graph of SecAgg
(Bonawitz et al., CCS 2017) by a sparse ``k``-regular graph: each node
agrees pairwise masks with, and secret-shares its keys among, only its ``k``
neighbours. Here the graph is a ring over the *sorted* node ids in which every
node is linked to the ``k/2`` nearest nodes on each side; it is a deterministic
function of the participant list, so the server and every client compute the
same graph without exchanging it. With ``k >= n - 1`` the graph is complete and
the protocol is plain SecAgg.

Parameter rule
--------------
Each node's secrets are split among ``k + 1`` holders (the node itself and its
``k`` neighbours) with reconstruction threshold ``t``.

* Privacy requires ``2 t > k + 1`` (a strict majority of the holders, which
  implies ``t > k/2``). An honest client only ever reveals *one* kind of share
  (self-mask seed ``b`` or mask key ``s_sk``) per node and answers only one
  unmasking request per round, so the holders answering "b" and those
  answering "s_sk" for a node are disjoint; with a strict-majority threshold a
  server that lies about who dropped cannot reach ``t`` shares of both kinds
  from two disjoint halves.
* Collusion: ``c`` sites of a node's neighbourhood that collude with the server
  answer both kinds, so a lying server reaches ``t`` of each once
  ``2 t - k - 1 <= c``; and ``c`` colluding neighbours know their pairwise
  masks with the node, so with the node's own self-mask share they rebuild its
  input once ``t <= c + 1``. A node withstands ``c`` colluders only while
  ``2 t - k - 1 > c`` and ``t > c + 1``.
* Robustness: a node's self-mask (if it survived) or mask key (if it dropped)
  can be reconstructed as long as at most ``k + 1 - t`` of its holders drop out.
* ``k`` should grow like ``O(log n)`` so that the graph stays connected and no
  node is isolated among colluders/dropouts with high probability, while the
  client cost is ``O(k)`` key agreements and PRG expansions instead of ``O(n)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence

from .crypto import check_uint64
from .errors import ConfigError, InvalidMessageError

__all__ = ["RingGraph", "neighbours", "default_k", "default_threshold", "validate_parameters"]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sorted_unique_ids(node_ids: Sequence[int]) -> list[int]:
    ids = [check_uint64(i, "node id") for i in node_ids]
    uniq = sorted(set(ids))
    if len(uniq) != len(ids):
        raise InvalidMessageError(
            "node id list contains duplicates; the communication graph would be "
            "ambiguous and the round cannot start"
        )
    return uniq


def neighbours(node_ids: Sequence[int], k: int) -> dict[int, list[int]]:
    """Compute the SecAgg+ ring graph.

    Parameters
    ----------
    node_ids : Sequence[int]
        Distinct participant node ids (unsigned 64-bit); order is irrelevant.
    k : int
        Number of neighbours per node. If ``k >= n - 1`` every node is every
        other node's neighbour (SecAgg). Otherwise ``k`` must be even and each
        node is linked to the ``k/2`` nearest nodes on each side of the ring of
        sorted ids.

    Returns
    -------
    dict[int, list[int]]
        For each node id, the sorted list of its neighbours (never itself). The
        relation is symmetric.

    Raises
    ------
    ConfigError
        If ``k`` is negative, or odd while smaller than ``n - 1``.
    InvalidMessageError
        If ids are duplicated or outside the unsigned 64-bit range.
    """
    ids = _sorted_unique_ids(node_ids)
    n = len(ids)
    if not _is_int(k) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}; the round cannot be configured")
    k = int(k)
    if k < n - 1 and k % 2:
        raise ConfigError(
            f"k={k} must be even when smaller than n-1={n - 1} (k/2 neighbours on "
            "each side of the ring); choose an even k"
        )
    return dict(RingGraph(ids, k))


class RingGraph(Mapping[int, list[int]]):
    """The graph of :func:`neighbours` as a read-only mapping, each node's list made when asked.

    A site needs only its own neighbours: building every node's list is
    ``O(n k)`` work per use, which a site did at every stage of every round (at
    1,000 sites about 20,000 set insertions each time). ``ids`` must be sorted and
    distinct, and ``k`` even or at least ``len(ids) - 1`` (as :func:`neighbours` and
    :func:`validate_parameters` check).
    """

    def __init__(self, ids: Sequence[int], k: int) -> None:
        self._ids = tuple(ids)
        self._position = {node: pos for pos, node in enumerate(self._ids)}
        self._half = None if k >= len(self._ids) - 1 else k // 2
        self._made: dict[int, list[int]] = {}

    def __getitem__(self, node: int) -> list[int]:
        if node not in self._made:
            pos, n = self._position[node], len(self._ids)
            if self._half is None:
                nbrs = set(self._ids) - {node}
            else:
                nbrs = {self._ids[(pos + d) % n] for d in range(1, self._half + 1)}
                nbrs |= {self._ids[(pos - d) % n] for d in range(1, self._half + 1)}
            self._made[node] = sorted(nbrs)
        return list(self._made[node])

    def __contains__(self, node: object) -> bool:
        return node in self._position

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def default_k(n: int) -> int:
    """Recommended number of neighbours for ``n`` participants.

    ``k = 2 * ceil(log2 n)`` (always even), capped at ``n - 1``, the complete
    graph, i.e. plain SecAgg, which small cohorts (``n <= 7``) get. Examples:
    ``n=5 -> 4``, ``n=10 -> 8``, ``n=20 -> 10``, ``n=100 -> 14``, ``n=1000 -> 20``.
    Logarithmic growth (Bell et al.) keeps the per-client cost at
    ``O(log n)`` key agreements and mask expansions. Flower node ids are random
    64-bit values, so ring neighbourhoods are effectively random subsets and a
    node is unlikely to be surrounded only by dropouts or colluders; raise
    ``k`` (and ``t`` with it) for high dropout or corruption rates.

    Parameters
    ----------
    n : int
        Number of participants (``>= 1``).

    Returns
    -------
    int
        The neighbour count ``k``.

    Raises
    ------
    ConfigError
        If ``n < 1``.
    """
    if not _is_int(n) or n < 1:
        raise ConfigError(f"number of participants must be >= 1, got {n!r}; there is no round to run")
    n = int(n)
    if n <= 2:
        return n - 1
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(k: int) -> int:
    """Recommended Shamir threshold for ``k`` neighbours (``k + 1`` holders).

    ``t = max(floor(2k/3) + 1, floor(k/2) + 2)``, capped at ``k + 1``. The
    first term keeps roughly two thirds of the neighbourhood necessary (so up to
    about a third of it may collude with the server or drop out); the second
    gives ``2t - k - 1 >= 2`` for small ``k``, so that the round withstands one
    colluding site (a site's default policy, ``max-colluders = 1``), which also
    implies the privacy rule ``2t > k + 1``. The cost is robustness in small
    cohorts: with ``k = 2`` (three sites) ``t = 3``, and a site that drops after
    sharing its keys cannot be recovered. Examples: ``k=1 -> 2``, ``k=2 -> 3``,
    ``k=3 -> 3``, ``k=4 -> 4``, ``k=6 -> 5``, ``k=8 -> 6``, ``k=10 -> 7``.

    Parameters
    ----------
    k : int
        Effective number of neighbours (``min(k, n - 1)``), ``>= 0``.

    Returns
    -------
    int
        The threshold ``t``.

    Raises
    ------
    ConfigError
        If ``k < 0``.
    """
    if not _is_int(k) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}; the round cannot be configured")
    k = int(k)
    return min(k + 1, max((2 * k) // 3 + 1, k // 2 + 2))


def validate_parameters(n: int, k: int, threshold: int) -> int:
    """Check ``(n, k, t)`` against the SecAgg+ rules and return the effective ``k``.

    Parameters
    ----------
    n : int
        Number of participants selected for the round.
    k : int
        Requested neighbour count.
    threshold : int
        Shamir reconstruction threshold ``t``.

    Returns
    -------
    int
        ``min(k, n - 1)``, the actual number of neighbours per node.

    Raises
    ------
    ConfigError
        If ``n < 1``; ``k`` is negative, odd while below ``n - 1``, or zero with
        more than one participant (no pairwise masks, no privacy); or ``t`` is
        not in ``[1, k_eff + 1]``; or ``2 t <= k_eff + 1`` (a server lying about
        dropouts could then unmask an individual input).
    """
    if not _is_int(n) or n < 1:
        raise ConfigError(f"number of participants must be >= 1, got {n!r}; there is no round to run")
    if not _is_int(k) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}; the round cannot be configured")
    n, k = int(n), int(k)
    k_eff = min(k, n - 1)
    if n > 1 and k_eff < 1:
        raise ConfigError(
            f"k={k} gives nodes no neighbours among {n} participants: inputs would "
            "carry no pairwise masks and the server could unmask them; use k >= 2"
        )
    if k_eff < n - 1 and k_eff % 2:
        raise ConfigError(f"k={k} must be even when smaller than n-1={n - 1}; choose an even k")
    if not _is_int(threshold):
        raise ConfigError(f"threshold must be an integer, got {threshold!r}; the round cannot be configured")
    threshold = int(threshold)
    holders = k_eff + 1
    if not 1 <= threshold <= holders:
        raise ConfigError(
            f"threshold={threshold} must lie in [1, k+1={holders}] (each node's "
            f"secrets are split among itself and its {k_eff} neighbours)"
        )
    if 2 * threshold <= holders:
        raise ConfigError(
            f"threshold={threshold} is not a strict majority of the {holders} share "
            "holders (need 2t > k+1): a server lying about dropouts could collect "
            "both mask shares of one node and unmask its input; raise the threshold "
            f"to at least {holders // 2 + 1}"
        )
    return k_eff
