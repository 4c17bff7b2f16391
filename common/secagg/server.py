"""Server side of SecAgg+ as a pure state machine (one instance per round)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from .crypto import agree, check_uint64, public_key_from_private, validate_public_key
from .errors import ConfigError, InvalidMessageError, ProtocolAbort, StageError
from .graph import neighbours, validate_parameters
from .prg import MASK_DTYPE, expand_mask
from .protocol import (
    B_SHARES,
    C_PK,
    PURPOSE_MASK,
    S_PK,
    SHARE_CIPHERTEXT_BYTES,
    SK_SHARES,
    ServerStage,
)
from .shamir import SECRET_BYTES, combine_shares

__all__ = ["ServerState"]

logger = logging.getLogger(__name__)


class ServerState:
    """Per-round SecAgg+ state of the server.

    Stages, in order (each stage method may be called once and raises
    :class:`StageError` otherwise; a call that raises leaves the state
    unchanged, so the caller may drop the offending node's message and retry):

    1. :meth:`broadcast_keys` with the advertise replies that arrived;
    2. :meth:`route_shares` with the share-keys replies that arrived;
    3. :meth:`add_masked_input` once per arriving masked vector, then
       :meth:`unmask_request`;
    4. :meth:`finalize` with the unmask replies that arrived.

    Nodes whose neighbourhood has shrunk below ``t`` holders (itself plus live
    neighbours) are pruned at stages 1 and 2, since their masks could never be
    removed; they are treated like dropouts.

    Parameters
    ----------
    node_ids : Sequence[int]
        All node ids selected for the round (defines the neighbour graph).
    threshold : int
        Shamir threshold ``t``; also the minimum number of live nodes at every
        stage.
    k : int
        Neighbour count (``>= n - 1`` means plain SecAgg).
    vector_length : int
        Length of every masked input vector.
    run_id : int
        Flower run id (unsigned 64-bit).
    round_id : int
        Server round (non-negative).

    Raises
    ------
    ConfigError
        If the parameters violate the SecAgg+ rules.
    """

    def __init__(
        self,
        node_ids: Sequence[int],
        *,
        threshold: int,
        k: int,
        vector_length: int,
        run_id: int,
        round_id: int,
    ) -> None:
        self.graph: dict[int, list[int]] = neighbours(node_ids, k)
        self.k = validate_parameters(len(self.graph), k, threshold)
        self.threshold = threshold
        self.node_ids: tuple[int, ...] = tuple(sorted(self.graph))
        self.run_id = check_uint64(run_id, "run_id")
        self.round_id = check_uint64(round_id, "round_id")
        if (
            isinstance(vector_length, bool)
            or not isinstance(vector_length, int)
            or vector_length < 0
        ):
            raise ConfigError(
                f"vector_length must be a non-negative integer, got {vector_length!r}; "
                "the round cannot be configured"
            )
        self.vector_length = vector_length
        self.stage = ServerStage.COLLECT_KEYS
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._bundles: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._routed_from: dict[int, frozenset[int]] = {}
        self._acc: np.ndarray | None = None
        self._u3: set[int] = set()
        self.survivors: list[int] = []
        self.dropped: list[int] = []

    # ------------------------------------------------------------------ helpers
    def _require(self, stage: ServerStage, action: str) -> None:
        if self.stage is not stage:
            raise StageError(
                f"server cannot {action} in stage '{self.stage.value}' (expected "
                f"'{stage.value}'); the call is ignored and the round state is unchanged"
            )

    def _known(self, raw_id: int, what: str) -> int:
        node = check_uint64(raw_id, what)
        if node not in self.graph:
            raise InvalidMessageError(
                f"{what} {node} is not a participant of this round; its message is "
                "rejected"
            )
        return node

    def _prune(self, alive: set[int], stage: str) -> set[int]:
        """Largest subset where each node has at least ``t - 1`` live neighbours."""
        alive = set(alive)
        changed = True
        while changed:
            changed = False
            for node in sorted(alive):
                live = sum(1 for j in self.graph[node] if j in alive)
                if live + 1 < self.threshold:
                    alive.discard(node)
                    changed = True
                    logger.warning(
                        "%s stage: node %d has only %d live neighbours (threshold %d); "
                        "treating it as dropped",
                        stage,
                        node,
                        live,
                        self.threshold,
                    )
        return alive

    def _check_alive(self, count: int, stage: str, answered: int | None = None) -> None:
        if count < self.threshold:
            pruned = (
                f" ({answered} answered, {answered - count} of them removed for having "
                "too few live neighbours)"
                if answered is not None and answered != count
                else ""
            )
            raise ProtocolAbort(
                f"{stage} stage: only {count} nodes remain{pruned} but threshold is "
                f"{self.threshold}; the aggregate cannot be recovered and the round "
                "is aborted"
            )

    # ------------------------------------------------------------------- stages
    def broadcast_keys(
        self, adverts: Mapping[int, Mapping[str, bytes]]
    ) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Stage 1: collect advertised public keys and build each node's key bundle.

        Parameters
        ----------
        adverts : Mapping[int, Mapping[str, bytes]]
            ``node_id -> {"c_pk": bytes, "s_pk": bytes}`` for every node that
            answered (absent nodes dropped out).

        Returns
        -------
        dict[int, dict[int, tuple[bytes, bytes]]]
            For each live node ``i`` (``U1``): ``{j: (c_pk_j, s_pk_j)}`` over
            ``i`` and its live neighbours. Send ``result[i]`` to node ``i``.

        Raises
        ------
        InvalidMessageError
            Unknown node, malformed or reused public keys.
        ProtocolAbort
            Fewer than ``t`` nodes remain.
        StageError
            If called out of order.
        """
        self._require(ServerStage.COLLECT_KEYS, "broadcast keys")
        keys: dict[int, tuple[bytes, bytes]] = {}
        seen: dict[bytes, int] = {}
        for raw_id, msg in adverts.items():
            node = self._known(raw_id, "advertising node")
            try:
                c_pk, s_pk = msg[C_PK], msg[S_PK]
            except (KeyError, TypeError):
                raise InvalidMessageError(
                    f"advertise message of node {node} lacks '{C_PK}'/'{S_PK}'; node "
                    f"{node} cannot take part in this round"
                ) from None
            for name, key in ((C_PK, c_pk), (S_PK, s_pk)):
                key = validate_public_key(key, owner=node, name=name)
                if key in seen:
                    raise InvalidMessageError(
                        f"{name} of node {node} duplicates a public key of node "
                        f"{seen[key]}; keys must be fresh and distinct, so node {node}'s "
                        "advertisement is rejected"
                    )
                seen[key] = node
            keys[node] = (bytes(c_pk), bytes(s_pk))
        u1 = self._prune(set(keys), "advertise-keys")
        self._check_alive(len(u1), "advertise-keys", len(keys))
        bundles = {
            i: {j: keys[j] for j in [i, *self.graph[i]] if j in u1} for i in sorted(u1)
        }
        self._keys = {i: keys[i] for i in u1}
        self._bundles = bundles
        self.stage = ServerStage.COLLECT_SHARES
        logger.info("advertise-keys stage: %d/%d nodes live", len(u1), len(self.graph))
        return bundles

    def route_shares(
        self, shares: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2: check and route encrypted shares.

        Parameters
        ----------
        shares : Mapping[int, Mapping[int, bytes]]
            ``sender -> {receiver -> ciphertext}`` for every node that answered.
            A sender must address exactly the neighbours in its key bundle.

        Returns
        -------
        dict[int, dict[int, bytes]]
            ``receiver -> {sender -> ciphertext}`` for every live node ``i``
            (``U2``); ``i``'s masking set is the key set of ``result[i]``.

        Raises
        ------
        InvalidMessageError
            Sender not in ``U1``, wrong receiver set, malformed ciphertext.
        ProtocolAbort
            Fewer than ``t`` nodes remain.
        StageError
            If called out of order.
        """
        self._require(ServerStage.COLLECT_SHARES, "route shares")
        checked: dict[int, dict[int, bytes]] = {}
        for raw_id, per_receiver in shares.items():
            sender = self._known(raw_id, "share sender")
            if sender not in self._bundles:
                raise InvalidMessageError(
                    f"node {sender} sent shares but did not get a key bundle (it dropped "
                    "or was pruned earlier); its shares are rejected"
                )
            expected = set(self._bundles[sender]) - {sender}
            got = {check_uint64(r, "share receiver") for r in per_receiver}
            if got != expected or len(got) != len(per_receiver):
                raise InvalidMessageError(
                    f"node {sender} addressed shares to {sorted(got)} but its live "
                    f"neighbours are {sorted(expected)}; pairwise masks would not match, "
                    "so its shares are rejected"
                )
            for receiver, ct in per_receiver.items():
                if not isinstance(ct, (bytes, bytearray)) or len(ct) != SHARE_CIPHERTEXT_BYTES:
                    raise InvalidMessageError(
                        f"ciphertext from node {sender} to node {receiver} must be "
                        f"{SHARE_CIPHERTEXT_BYTES} bytes; node {sender}'s shares are "
                        "rejected"
                    )
            checked[sender] = {int(r): bytes(ct) for r, ct in per_receiver.items()}
        u2 = self._prune(set(checked), "share-keys")
        self._check_alive(len(u2), "share-keys", len(checked))
        routed: dict[int, dict[int, bytes]] = {i: {} for i in sorted(u2)}
        for sender in sorted(u2):
            for receiver, ct in checked[sender].items():
                if receiver in u2:
                    routed[receiver][sender] = ct
        self._routed_from = {i: frozenset(v) for i, v in routed.items()}
        self._acc = np.zeros(self.vector_length, dtype=MASK_DTYPE)
        self.stage = ServerStage.COLLECT_MASKED
        logger.info("share-keys stage: %d nodes live", len(u2))
        return routed

    def add_masked_input(self, node_id: int, y: np.ndarray) -> None:
        """Stage 3: add one masked input vector to the running sum.

        Parameters
        ----------
        node_id : int
            Sender of the vector.
        y : numpy.ndarray
            1-D ``uint32`` vector of length ``vector_length``.

        Raises
        ------
        InvalidMessageError
            Unknown node, node not in ``U2`` (its masks cannot be removed),
            duplicate submission, or wrong dtype / shape / length.
        StageError
            If called before :meth:`route_shares` or after :meth:`unmask_request`.
        """
        self._require(ServerStage.COLLECT_MASKED, "accept masked input")
        node = self._known(node_id, "masked-input sender")
        if node not in self._routed_from:
            raise InvalidMessageError(
                f"node {node} sent a masked input but did not complete key sharing; its "
                "masks cannot be removed, so the input is rejected"
            )
        if node in self._u3:
            raise InvalidMessageError(
                f"duplicate masked input from node {node}; only the first one counts "
                "and this one is rejected"
            )
        if not isinstance(y, np.ndarray):
            raise InvalidMessageError(
                f"masked input of node {node} must be a numpy array, got "
                f"{type(y).__name__}; the input is rejected"
            )
        if y.dtype != np.uint32:
            raise InvalidMessageError(
                f"masked input of node {node} has dtype {y.dtype}, expected uint32; "
                "the input is rejected"
            )
        if y.ndim != 1 or y.shape[0] != self.vector_length:
            raise InvalidMessageError(
                f"masked input of node {node} has shape {y.shape}, expected "
                f"({self.vector_length},); the input is rejected"
            )
        assert self._acc is not None
        np.add(self._acc, y, out=self._acc)
        self._u3.add(node)

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """Close stage 3 and build the unmask request.

        Returns
        -------
        tuple[list[int], list[int]]
            ``(survivors, dropped)``: nodes whose masked input arrived (``U3``)
            and nodes that shared keys but whose input did not (``U2 \\ U3``),
            both sorted. Send both lists to every survivor.

        Raises
        ------
        ProtocolAbort
            Fewer than ``t`` masked inputs arrived.
        StageError
            If called out of order.
        """
        self._require(ServerStage.COLLECT_MASKED, "request unmasking")
        self._check_alive(len(self._u3), "masked-input")
        self.survivors = sorted(self._u3)
        self.dropped = sorted(set(self._routed_from) - self._u3)
        self.stage = ServerStage.COLLECT_UNMASK
        logger.info(
            "masked-input stage: %d survivors, %d dropped", len(self.survivors), len(self.dropped)
        )
        return list(self.survivors), list(self.dropped)

    def _collect_unmask_shares(
        self, unmask_replies: Mapping[int, Mapping[str, Mapping[int, tuple[int, bytes]]]]
    ) -> tuple[dict[int, list[tuple[int, bytes]]], dict[int, list[tuple[int, bytes]]]]:
        survivors, dropped = set(self.survivors), set(self.dropped)
        b_shares: dict[int, list[tuple[int, bytes]]] = {i: [] for i in self.survivors}
        sk_shares: dict[int, list[tuple[int, bytes]]] = {j: [] for j in self.dropped}
        for raw_id, reply in unmask_replies.items():
            responder = self._known(raw_id, "unmask responder")
            if responder not in survivors:
                raise InvalidMessageError(
                    f"node {responder} answered the unmask request but is not a survivor; "
                    "its reply is rejected"
                )
            try:
                b_part, sk_part = reply[B_SHARES], reply[SK_SHARES]
            except (KeyError, TypeError):
                raise InvalidMessageError(
                    f"unmask reply of node {responder} lacks '{B_SHARES}'/'{SK_SHARES}'; "
                    "its reply is rejected"
                ) from None
            holds = self._routed_from[responder]
            for part, allowed, target, kind in (
                (b_part, (holds & survivors) | {responder}, b_shares, "self-mask"),
                (sk_part, holds & dropped, sk_shares, "mask-key"),
            ):
                for raw_owner, share in part.items():
                    owner = check_uint64(raw_owner, "share owner")
                    if owner not in allowed:
                        raise InvalidMessageError(
                            f"node {responder} sent a {kind} share of node {owner}, which "
                            "it does not hold or which was not requested; its reply is "
                            "rejected"
                        )
                    try:
                        idx, value = share
                    except (TypeError, ValueError):
                        raise InvalidMessageError(
                            f"{kind} share of node {owner} from node {responder} must be "
                            "an (index, bytes) pair; its reply is rejected"
                        ) from None
                    if (
                        isinstance(idx, bool)
                        or not isinstance(idx, (int, np.integer))
                        or not isinstance(value, (bytes, bytearray))
                        or len(value) != SECRET_BYTES
                    ):
                        raise InvalidMessageError(
                            f"{kind} share of node {owner} from node {responder} is "
                            f"malformed (need int index and {SECRET_BYTES} bytes); its "
                            "reply is rejected"
                        )
                    target[owner].append((int(idx), bytes(value)))
        self._check_alive(len(unmask_replies), "unmask")
        return b_shares, sk_shares

    def finalize(
        self, unmask_replies: Mapping[int, Mapping[str, Mapping[int, tuple[int, bytes]]]]
    ) -> np.ndarray:
        """Stage 4: reconstruct secrets, remove all masks and return the sum.

        For every survivor ``i`` its self-mask seed ``b_i`` is reconstructed
        from ``>= t`` shares and ``PRG(b_i)`` is subtracted. For every dropped
        node ``j`` its mask private key ``s_sk_j`` is reconstructed (and checked
        against its advertised ``s_pk_j``) and, for each surviving masking
        neighbour ``i``, the orphaned pairwise mask ``PRG(s_ij)`` with
        ``s_ij = agree(s_sk_j, s_pk_i)`` is cancelled.

        Parameters
        ----------
        unmask_replies : Mapping[int, Mapping[str, Mapping[int, tuple[int, bytes]]]]
            ``responder -> {"b_shares": {owner: (index, share)}, "sk_shares": {...}}``
            from the survivors that answered (``U4``).

        Returns
        -------
        numpy.ndarray
            ``uint32`` vector equal to ``sum_{i in survivors} x_i mod 2**32``.

        Raises
        ------
        ProtocolAbort
            Fewer than ``t`` replies, fewer than ``t`` shares for some node, or
            a reconstructed mask key that does not match its public key.
        InvalidMessageError
            A reply from a non-survivor, or a share the responder cannot hold.
        StageError
            If called out of order.
        """
        self._require(ServerStage.COLLECT_UNMASK, "finalize")
        b_shares, sk_shares = self._collect_unmask_shares(unmask_replies)
        seeds_b: dict[int, bytes] = {}
        for owner, shares in b_shares.items():
            if len(shares) < self.threshold:
                raise ProtocolAbort(
                    f"unmask stage: only {len(shares)} self-mask shares of surviving node "
                    f"{owner} arrived but threshold is {self.threshold}; its mask cannot be "
                    "removed and the round is aborted"
                )
            seeds_b[owner] = combine_shares(shares, self.threshold)
        keys_sk: dict[int, bytes] = {}
        for owner, shares in sk_shares.items():
            if len(shares) < self.threshold:
                raise ProtocolAbort(
                    f"unmask stage: only {len(shares)} mask-key shares of dropped node "
                    f"{owner} arrived but threshold is {self.threshold}; its pairwise masks "
                    "cannot be removed and the round is aborted"
                )
            sk = combine_shares(shares, self.threshold)
            if public_key_from_private(sk) != self._keys[owner][1]:
                raise ProtocolAbort(
                    f"unmask stage: the mask key of dropped node {owner} reconstructed from "
                    "the received shares does not match its public key; at least one share "
                    "is corrupted and the round is aborted"
                )
            keys_sk[owner] = sk
        assert self._acc is not None
        total = self._acc.copy()
        length = self.vector_length
        for owner in self.survivors:
            np.subtract(total, expand_mask(seeds_b[owner], length), out=total)
        for j in self.dropped:
            for i in self.survivors:
                if j not in self._routed_from[i]:
                    continue
                seed = agree(
                    keys_sk[j],
                    self._keys[i][1],
                    run_id=self.run_id,
                    round_id=self.round_id,
                    node_a=j,
                    node_b=i,
                    purpose=PURPOSE_MASK,
                )
                mask = expand_mask(seed, length)
                # Survivor i added +PRG(s_ij) if j > i and subtracted it if j < i.
                if j > i:
                    np.subtract(total, mask, out=total)
                else:
                    np.add(total, mask, out=total)
        self.stage = ServerStage.DONE
        self._acc = None
        logger.info(
            "unmask stage: recovered sum of %d inputs (%d dropouts corrected)",
            len(self.survivors),
            len(self.dropped),
        )
        return total
