"""Client side of SecAgg+ as a pure state machine (one instance per node per round)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .crypto import (
    KEY_BYTES,
    agree,
    check_uint64,
    decrypt_share,
    encrypt_share,
    generate_key_pair,
)
from .errors import (
    ConfigError,
    InvalidMessageError,
    ProtocolAbort,
    StageError,
    UnmaskRefusedError,
)
from .graph import neighbours, validate_parameters
from .prg import MASK_DTYPE, expand_mask
from .protocol import (
    B_SHARES,
    C_PK,
    PURPOSE_MASK,
    PURPOSE_SHARE,
    S_PK,
    SK_SHARES,
    ClientStage,
    decode_share_payload,
    encode_share_payload,
)
from .shamir import split_secret

__all__ = ["ClientState"]

logger = logging.getLogger(__name__)


def _check_public_key_pair(node: int, value: object) -> tuple[bytes, bytes]:
    try:
        c_pk, s_pk = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidMessageError(
            f"public keys of node {node} must be a (c_pk, s_pk) pair; node {node} "
            "cannot be used as a neighbour in this round"
        ) from None
    for name, key in (("c_pk", c_pk), ("s_pk", s_pk)):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise InvalidMessageError(
                f"{name} of node {node} must be {KEY_BYTES} bytes; node {node} cannot "
                "be used as a neighbour in this round"
            )
    return bytes(c_pk), bytes(s_pk)


def _check_id_list(values: Sequence[int], known: set[int], what: str) -> list[int]:
    ids = [check_uint64(v, f"{what} node id") for v in values]
    if len(set(ids)) != len(ids):
        raise InvalidMessageError(
            f"{what} list contains duplicate node ids; the unmask request is malformed "
            "and will not be answered"
        )
    unknown = sorted(set(ids) - known)
    if unknown:
        raise InvalidMessageError(
            f"{what} list names nodes {unknown} that are not participants of this "
            "round; the unmask request is malformed and will not be answered"
        )
    return ids


class ClientState:
    """Per-round SecAgg+ state of one client.

    Methods must be called in order: :meth:`advertise_keys`,
    :meth:`share_keys`, :meth:`masked_input`, :meth:`unmask`. Each may be
    called once; calling out of order raises :class:`StageError`. A method that
    raises leaves the state unchanged.

    Parameters
    ----------
    node_id : int
        This node's id (unsigned 64-bit).
    node_ids : Sequence[int]
        All node ids selected for the round (including ``node_id``); the
        neighbour graph is derived from this list, exactly as on the server.
    threshold : int
        Shamir threshold ``t`` (see :func:`~common.secagg.graph.validate_parameters`).
    k : int
        Neighbour count (``>= n - 1`` means plain SecAgg).
    run_id : int
        Flower run id (unsigned 64-bit).
    round_id : int
        Server round (non-negative).

    Raises
    ------
    ConfigError
        If the parameters violate the SecAgg+ rules or ``node_id`` is not listed.
    """

    def __init__(
        self,
        node_id: int,
        node_ids: Sequence[int],
        *,
        threshold: int,
        k: int,
        run_id: int,
        round_id: int,
    ) -> None:
        self.node_id = check_uint64(node_id, "node_id")
        self.run_id = check_uint64(run_id, "run_id")
        self.round_id = check_uint64(round_id, "round_id")
        graph = neighbours(node_ids, k)
        if self.node_id not in graph:
            raise ConfigError(
                f"node {self.node_id} is not in the round's participant list; it cannot "
                "take part in this round"
            )
        self.k = validate_parameters(len(graph), k, threshold)
        self.threshold = threshold
        self.participants: frozenset[int] = frozenset(graph)
        self.neighbours: tuple[int, ...] = tuple(graph[self.node_id])
        self.stage = ClientStage.INIT
        self._c_sk: bytes | None = None
        self._c_pk: bytes | None = None
        self._s_sk: bytes | None = None
        self._s_pk: bytes | None = None
        self._b: bytes | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._own_share: tuple[int, bytes, bytes] | None = None
        self._received: dict[int, tuple[int, bytes, bytes]] = {}

    # ------------------------------------------------------------------ helpers
    def _require(self, stage: ClientStage, action: str) -> None:
        if self.stage is not stage:
            raise StageError(
                f"node {self.node_id} cannot {action} in stage '{self.stage.value}' "
                f"(expected '{stage.value}'); the call is ignored and the round "
                "state is unchanged"
            )

    def _agree(self, private: bytes | None, peer_pk: bytes, peer: int, purpose: bytes) -> bytes:
        assert private is not None
        return agree(
            private,
            peer_pk,
            run_id=self.run_id,
            round_id=self.round_id,
            node_a=self.node_id,
            node_b=peer,
            purpose=purpose,
        )

    # ------------------------------------------------------------------- stages
    def advertise_keys(self) -> dict[str, bytes]:
        """Stage 0: create the round's two X25519 key pairs and publish them.

        Returns
        -------
        dict[str, bytes]
            ``{"c_pk": ..., "s_pk": ...}``: the share-encryption and the
            mask-agreement public keys (32 bytes each).

        Raises
        ------
        StageError
            If called twice.
        """
        self._require(ClientStage.INIT, "advertise keys")
        self._c_sk, self._c_pk = generate_key_pair()
        self._s_sk, self._s_pk = generate_key_pair()
        self.stage = ClientStage.ADVERTISED
        return {C_PK: self._c_pk, S_PK: self._s_pk}

    def share_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1: secret-share the self-mask seed and mask key among the neighbourhood.

        A fresh 32-byte self-mask seed ``b`` is drawn from ``os.urandom``. ``b`` and
        the mask private key ``s_sk`` are each split ``t``-of-``h`` among the
        ``h`` holders = this node plus every neighbour present in
        ``public_keys``; holder ``p`` (in sorted id order) gets Shamir index
        ``p + 1``. Each neighbour's pair of shares is encrypted under
        ``agree(c_sk, c_pk_neighbour, purpose=b"share-enc")``; this node keeps
        its own pair.

        Parameters
        ----------
        public_keys : Mapping[int, tuple[bytes, bytes]]
            ``node_id -> (c_pk, s_pk)`` as relayed by the server (entries of
            non-neighbours are ignored; this node's own entry, if present, must
            match what it advertised).

        Returns
        -------
        dict[int, bytes]
            ``receiver_id -> ciphertext`` for every neighbour present.

        Raises
        ------
        InvalidMessageError
            If an entry names an unknown node, is malformed, or misstates this
            node's own keys.
        ProtocolAbort
            If fewer than ``t`` holders are available (too many neighbours
            dropped before advertising keys).
        StageError
            If called out of order.
        """
        self._require(ClientStage.ADVERTISED, "share keys")
        peers: dict[int, tuple[bytes, bytes]] = {}
        for raw_id, value in public_keys.items():
            node = check_uint64(raw_id, "node id in key bundle")
            if node not in self.participants:
                raise InvalidMessageError(
                    f"key bundle contains node {node}, which is not a participant of "
                    f"this round; node {self.node_id} will not share keys with it"
                )
            pair = _check_public_key_pair(node, value)
            if node == self.node_id:
                if pair != (self._c_pk, self._s_pk):
                    raise InvalidMessageError(
                        f"key bundle misstates node {self.node_id}'s own public keys; "
                        "the server relayed inconsistent keys and this node will not "
                        "share its secrets"
                    )
                continue
            if node in self.neighbours:
                peers[node] = pair
        holders = sorted([self.node_id, *peers])
        if len(holders) < self.threshold:
            raise ProtocolAbort(
                f"share-keys stage: node {self.node_id} has {len(holders)} share "
                f"holders (itself + {len(peers)} live neighbours) but threshold is "
                f"{self.threshold}; its masks could never be removed, so it drops out "
                "of this round"
            )
        assert self._c_sk is not None and self._s_sk is not None
        b = os.urandom(KEY_BYTES)
        b_shares = split_secret(b, self.threshold, len(holders))
        sk_shares = split_secret(self._s_sk, self.threshold, len(holders))
        out: dict[int, bytes] = {}
        own: tuple[int, bytes, bytes] | None = None
        for holder, (idx, b_sh), (idx2, sk_sh) in zip(holders, b_shares, sk_shares, strict=True):
            assert idx == idx2
            if holder == self.node_id:
                own = (idx, b_sh, sk_sh)
                continue
            key = self._agree(self._c_sk, peers[holder][0], holder, PURPOSE_SHARE)
            out[holder] = encrypt_share(
                key,
                encode_share_payload(self.node_id, holder, idx, b_sh, sk_sh),
                sender=self.node_id,
                receiver=holder,
                run_id=self.run_id,
                round_id=self.round_id,
            )
        self._b = b
        self._own_share = own
        self._peer_keys = peers
        self.stage = ClientStage.SHARED
        logger.debug(
            "node %d shared keys with %d neighbours (t=%d)", self.node_id, len(out), self.threshold
        )
        return out

    def masked_input(self, ciphertexts: Mapping[int, bytes], vector: np.ndarray) -> np.ndarray:
        """Stage 2: store received shares and mask the (quantized) input.

        The neighbours that sent shares (the keys of ``ciphertexts``) form this
        node's masking set, fixed from now on. The result is::

            y = x + PRG(b) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)  (mod 2**32)

        with ``s_ij = agree(s_sk_i, s_pk_j, purpose=b"mask")``.

        Parameters
        ----------
        ciphertexts : Mapping[int, bytes]
            ``sender_id -> ciphertext`` routed by the server.
        vector : numpy.ndarray
            1-D ``uint32`` input (e.g. from :func:`~common.secagg.quantize.quantize`).

        Returns
        -------
        numpy.ndarray
            The masked 1-D ``uint32`` vector, same length as ``vector``.

        Raises
        ------
        ShareDecryptionError
            If a ciphertext fails authentication (tampered, replayed from another
            round/run, or meant for another node); this node cannot continue.
        InvalidMessageError
            If a sender is not a neighbour with known keys, a payload is
            malformed, or ``vector`` is not a 1-D ``uint32`` array.
        ProtocolAbort
            If fewer than ``t - 1`` neighbours sent shares (this node's
            self-mask could never be reconstructed).
        StageError
            If called out of order.
        """
        self._require(ClientStage.SHARED, "compute its masked input")
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1:
            desc = (
                f"dtype {vector.dtype}, shape {vector.shape}"
                if isinstance(vector, np.ndarray)
                else type(vector).__name__
            )
            raise InvalidMessageError(
                f"input of node {self.node_id} must be a 1-D uint32 array, got {desc}; "
                "quantize the update first"
            )
        received: dict[int, tuple[int, bytes, bytes]] = {}
        for raw_id, ct in ciphertexts.items():
            sender = check_uint64(raw_id, "sender id")
            if sender not in self._peer_keys:
                raise InvalidMessageError(
                    f"node {self.node_id} received shares from node {sender}, which is "
                    "not a neighbour whose keys it received; the routed shares are "
                    "inconsistent and this node cannot continue the round"
                )
            key = self._agree(self._c_sk, self._peer_keys[sender][0], sender, PURPOSE_SHARE)
            payload = decrypt_share(
                key,
                ct,
                sender=sender,
                receiver=self.node_id,
                run_id=self.run_id,
                round_id=self.round_id,
            )
            received[sender] = decode_share_payload(payload, sender=sender, receiver=self.node_id)
        if len(received) + 1 < self.threshold:
            raise ProtocolAbort(
                f"masked-input stage: node {self.node_id} got shares from only "
                f"{len(received)} neighbours; with threshold {self.threshold} its "
                "self-mask could never be reconstructed, so it drops out of this round"
            )
        assert self._b is not None
        length = vector.shape[0]
        y = np.array(vector, dtype=MASK_DTYPE, copy=True)
        np.add(y, expand_mask(self._b, length), out=y)
        for peer in sorted(received):
            seed = self._agree(self._s_sk, self._peer_keys[peer][1], peer, PURPOSE_MASK)
            mask = expand_mask(seed, length)
            if peer > self.node_id:
                np.add(y, mask, out=y)
            else:
                np.subtract(y, mask, out=y)
            del mask
        self._received = received
        # Secrets no longer needed after masking (the shares are kept for stage 3).
        self._b = None
        self._s_sk = None
        self._c_sk = None
        self.stage = ClientStage.MASKED
        return y

    def unmask(
        self, survivors: Sequence[int], dropped: Sequence[int]
    ) -> dict[str, dict[int, tuple[int, bytes]]]:
        """Stage 3: reveal the shares the server needs to remove the masks.

        For every node in ``survivors`` whose shares this node holds (its
        masking neighbours and itself) it reveals the self-mask seed share; for
        every node in ``dropped`` whose shares it holds it reveals the mask
        private-key share. It never reveals both kinds for one node and never
        reveals its own mask-key share.

        Parameters
        ----------
        survivors : Sequence[int]
            Nodes whose masked input reached the server (``U3``).
        dropped : Sequence[int]
            Nodes that shared keys but whose masked input did not arrive
            (``U2 \\ U3``).

        Returns
        -------
        dict[str, dict[int, tuple[int, bytes]]]
            ``{"b_shares": {owner: (index, share)}, "sk_shares": {owner: (index, share)}}``.

        Raises
        ------
        UnmaskRefusedError
            If a node is listed both as survivor and as dropped: answering would
            give the server both the self-mask and the mask key of that node,
            i.e. its individual input.
        InvalidMessageError
            If the lists contain duplicates or unknown node ids.
        ProtocolAbort
            If fewer than ``t`` survivors are listed.
        StageError
            If called out of order or a second time.
        """
        self._require(ClientStage.MASKED, "answer an unmask request")
        surv = _check_id_list(survivors, set(self.participants), "survivors")
        drop = _check_id_list(dropped, set(self.participants), "dropped")
        both = sorted(set(surv) & set(drop))
        if both:
            raise UnmaskRefusedError(
                f"node {self.node_id} refuses to unmask: nodes {both} are listed as both "
                "survivor and dropped, which would reveal both the self-mask and the "
                "mask key (hence the individual input) of those nodes; the server is "
                "misbehaving and this node will not help finish the round"
            )
        if len(surv) < self.threshold:
            raise ProtocolAbort(
                f"unmask stage: only {len(surv)} survivors listed but threshold is "
                f"{self.threshold}; node {self.node_id} will not reveal shares for a "
                "round that cannot be completed securely"
            )
        if self.node_id not in surv:
            logger.warning(
                "node %d: server reports that its masked input did not arrive",
                self.node_id,
            )
        assert self._own_share is not None
        b_out: dict[int, tuple[int, bytes]] = {}
        sk_out: dict[int, tuple[int, bytes]] = {}
        for owner in surv:
            if owner == self.node_id:
                b_out[owner] = (self._own_share[0], self._own_share[1])
            elif owner in self._received:
                idx, b_sh, _ = self._received[owner]
                b_out[owner] = (idx, b_sh)
        for owner in drop:
            if owner in self._received:  # never its own s_sk share
                idx, _, sk_sh = self._received[owner]
                sk_out[owner] = (idx, sk_sh)
        unlisted = sorted(set(self._received) - set(surv) - set(drop))
        if unlisted:
            logger.warning(
                "node %d: masking neighbours %s are neither survivors nor dropped; the "
                "server's aggregate will be wrong",
                self.node_id,
                unlisted,
            )
        self._received = {}
        self._own_share = None
        self._peer_keys = {}
        self.stage = ClientStage.DONE
        return {B_SHARES: b_out, SK_SHARES: sk_out}
