"""Client side of SecAgg+ as a pure state machine (one instance per node per round)."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from .crypto import (
    KEY_BYTES,
    agree,
    check_uint64,
    decrypt_share,
    encrypt_share,
    generate_key_pair,
    public_key_from_private,
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
from .shamir import SECRET_BYTES, split_secret

__all__ = ["ClientState", "StateFormatError", "STATE_FORMAT", "STATE_VERSION"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "fedseal.secagg.client-state"
"""Value of the ``"format"`` entry of :meth:`ClientState.export_state`."""
STATE_VERSION = 1
"""Value of the ``"version"`` entry of :meth:`ClientState.export_state`."""

_U64 = struct.Struct(">Q")
_IDX = struct.Struct(">H")
_INT64_MAX = 2**63 - 1
_OWN_SHARE_BYTES = _IDX.size + 2 * SECRET_BYTES
_PEER_KEY_BYTES = _U64.size + 2 * KEY_BYTES
_RECEIVED_BYTES = _U64.size + _IDX.size + 2 * SECRET_BYTES
_SECRET_FIELDS = ("c_sk", "c_pk", "s_sk", "s_pk", "b")
# Schema of an exported state: key -> expected Python type.
_STATE_SCHEMA: dict[str, type] = {
    "format": str,
    "version": int,
    "stage": str,
    "node_id": bytes,
    "run_id": bytes,
    "round_id": bytes,
    "threshold": int,
    "k": int,
    "participants": bytes,
    "neighbours": bytes,
    "c_sk": bytes,
    "c_pk": bytes,
    "s_sk": bytes,
    "s_pk": bytes,
    "b": bytes,
    "own_share": bytes,
    "peer_keys": bytes,
    "received": bytes,
    "digest": bytes,
}
# Which optional secrets must be present (True) or absent (False) in each stage.
_PRESENT: dict[ClientStage, dict[str, bool]] = {
    ClientStage.INIT: {
        "c_sk": False, "c_pk": False, "s_sk": False, "s_pk": False, "b": False,
        "own_share": False,
    },
    ClientStage.ADVERTISED: {
        "c_sk": True, "c_pk": True, "s_sk": True, "s_pk": True, "b": False,
        "own_share": False,
    },
    ClientStage.SHARED: {
        "c_sk": True, "c_pk": True, "s_sk": True, "s_pk": True, "b": True,
        "own_share": True,
    },
    ClientStage.MASKED: {
        "c_sk": False, "c_pk": True, "s_sk": False, "s_pk": True, "b": False,
        "own_share": True,
    },
    ClientStage.DONE: {
        "c_sk": False, "c_pk": True, "s_sk": False, "s_pk": True, "b": False,
        "own_share": False,
    },
}


class StateFormatError(InvalidMessageError):
    """An exported :class:`ClientState` is malformed, corrupted or of another version.

    Raised by :meth:`ClientState.restore_state`. The node cannot continue the
    round from that record; it should drop out of the round (the protocol
    tolerates dropouts) rather than guess.
    """


def _pack_ids(ids: Sequence[int]) -> bytes:
    return b"".join(_U64.pack(i) for i in ids)


def _state_digest(data: Mapping[str, object]) -> bytes:
    """SHA-256 over a canonical encoding of every entry except ``"digest"``."""
    h = hashlib.sha256(STATE_FORMAT.encode())
    for key in sorted(_STATE_SCHEMA):
        if key == "digest":
            continue
        value = data[key]
        if isinstance(value, str):
            raw = b"s" + value.encode("utf-8")
        elif isinstance(value, int):
            raw = b"i" + str(value).encode("ascii")
        else:
            raw = b"b" + bytes(value)  # type: ignore[arg-type]
        h.update(key.encode("ascii"))
        h.update(_U64.pack(len(raw)))
        h.update(raw)
    return h.digest()


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

    # ------------------------------------------------------------ persistence
    def export_state(self) -> dict[str, bytes | int | str]:
        """Serialise the whole state into a flat mapping of ``bytes`` / ``int`` / ``str``.

        The result can be stored in a Flower ``ConfigRecord`` (e.g. in
        ``Context.state`` between the per-message invocations of a ClientApp)
        and turned back into an equivalent object with :meth:`restore_state`,
        at any stage. Every ``int`` value fits a signed 64-bit integer; node,
        run and round ids (unsigned 64-bit) are stored as big-endian 8-byte
        strings. Absent secrets are stored as empty ``bytes``.

        Entries (``format`` / ``version`` identify the layout):

        * ``format`` (str) = :data:`STATE_FORMAT`, ``version`` (int) = :data:`STATE_VERSION`;
        * ``stage`` (str): the :class:`~common.secagg.protocol.ClientStage` value;
        * ``node_id``, ``run_id``, ``round_id`` (8 bytes each, ``>u8``);
        * ``threshold``, ``k`` (int; ``k`` is the effective neighbour count);
        * ``participants``, ``neighbours`` (bytes): sorted ids, packed ``>u8``;
        * ``c_sk``, ``c_pk``, ``s_sk``, ``s_pk``, ``b`` (32 bytes or empty):
          key pairs and self-mask seed;
        * ``own_share`` (66 bytes or empty): ``>u2`` index, seed share, key share;
        * ``peer_keys`` (72 bytes per neighbour): ``>u8`` id, ``c_pk``, ``s_pk``;
        * ``received`` (74 bytes per sender): ``>u8`` id, ``>u2`` index, seed
          share, key share;
        * ``digest`` (32 bytes): SHA-256 over all other entries, so accidental
          corruption is detected on restore.

        The mapping contains this node's private keys and shares: store it
        only where the node's own secrets may live (it must never be sent).

        Returns
        -------
        dict[str, bytes | int | str]
            The flat state mapping.
        """
        own = b""
        if self._own_share is not None:
            idx, b_sh, sk_sh = self._own_share
            own = _IDX.pack(idx) + b_sh + sk_sh
        data: dict[str, bytes | int | str] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "stage": self.stage.value,
            "node_id": _U64.pack(self.node_id),
            "run_id": _U64.pack(self.run_id),
            "round_id": _U64.pack(self.round_id),
            "threshold": int(self.threshold),
            "k": int(self.k),
            "participants": _pack_ids(sorted(self.participants)),
            "neighbours": _pack_ids(sorted(self.neighbours)),
            "c_sk": self._c_sk or b"",
            "c_pk": self._c_pk or b"",
            "s_sk": self._s_sk or b"",
            "s_pk": self._s_pk or b"",
            "b": self._b or b"",
            "own_share": own,
            "peer_keys": b"".join(
                _U64.pack(node) + c_pk + s_pk
                for node, (c_pk, s_pk) in sorted(self._peer_keys.items())
            ),
            "received": b"".join(
                _U64.pack(node) + _IDX.pack(idx) + b_sh + sk_sh
                for node, (idx, b_sh, sk_sh) in sorted(self._received.items())
            ),
        }
        data["digest"] = _state_digest(data)
        return data

    @classmethod
    def restore_state(cls, data: Mapping[str, object]) -> ClientState:
        """Rebuild a :class:`ClientState` from the output of :meth:`export_state`.

        The record is fully validated (entry names, types, lengths, version,
        digest, SecAgg+ parameters, the neighbour graph, key pairs and the
        entries required by the recorded stage) before an object is built.

        Parameters
        ----------
        data : Mapping[str, object]
            The mapping produced by :meth:`export_state` (for instance
            ``dict(config_record.items())``); ``bytearray`` values are accepted.

        Returns
        -------
        ClientState
            A state that continues the protocol exactly where the exported one
            stood.

        Raises
        ------
        StateFormatError
            (a subclass of :class:`InvalidMessageError`) if the record is not a
            mapping, lacks or adds entries, has a wrong type, length, version or
            digest, or is internally inconsistent.
        """

        def fail(why: str) -> StateFormatError:
            return StateFormatError(
                f"cannot restore the secure-aggregation client state: {why}; the "
                "record is corrupted or from another version, so this node cannot "
                "continue the round"
            )

        if not isinstance(data, Mapping):
            raise fail(f"expected a mapping, got {type(data).__name__}")
        keys = set(data)
        missing = sorted(set(_STATE_SCHEMA) - keys)
        extra = sorted(str(k) for k in keys - set(_STATE_SCHEMA))
        if missing or extra:
            raise fail(f"missing entries {missing}, unexpected entries {extra}")
        clean: dict[str, bytes | int | str] = {}
        for key, kind in _STATE_SCHEMA.items():
            value = data[key]
            if kind is bytes and isinstance(value, (bytes, bytearray)):
                clean[key] = bytes(value)
            elif kind is int and isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value <= _INT64_MAX:
                    raise fail(f"entry '{key}'={value} is outside [0, 2**63 - 1]")
                clean[key] = int(value)
            elif kind is str and isinstance(value, str):
                clean[key] = value
            else:
                raise fail(
                    f"entry '{key}' must be {kind.__name__}, got {type(value).__name__}"
                )
        if clean["format"] != STATE_FORMAT:
            raise fail(f"format is {clean['format']!r}, expected {STATE_FORMAT!r}")
        if clean["version"] != STATE_VERSION:
            raise fail(f"version is {clean['version']}, this code reads version {STATE_VERSION}")
        try:
            stage = ClientStage(clean["stage"])
        except ValueError:
            raise fail(f"unknown stage {clean['stage']!r}") from None

        def raw(key: str) -> bytes:
            value = clean[key]
            assert isinstance(value, bytes)
            return value

        def records(key: str, width: int) -> list[bytes]:
            value = raw(key)
            if len(value) % width:
                raise fail(f"entry '{key}' has {len(value)} bytes, not a multiple of {width}")
            return [value[off : off + width] for off in range(0, len(value), width)]

        def ids(key: str) -> list[int]:
            out = [_U64.unpack(r)[0] for r in records(key, _U64.size)]
            if out != sorted(set(out)):
                raise fail(f"ids in entry '{key}' are not sorted and distinct")
            return out

        for key in ("node_id", "run_id", "round_id"):
            if len(raw(key)) != _U64.size:
                raise fail(f"entry '{key}' must be {_U64.size} bytes, got {len(raw(key))}")
        node_id = _U64.unpack(raw("node_id"))[0]
        run_id = _U64.unpack(raw("run_id"))[0]
        round_id = _U64.unpack(raw("round_id"))[0]
        participants = ids("participants")
        neighbour_ids = ids("neighbours")
        for key in _SECRET_FIELDS:
            if len(raw(key)) not in (0, KEY_BYTES):
                raise fail(f"entry '{key}' must be {KEY_BYTES} bytes or empty, got {len(raw(key))}")
        if len(raw("own_share")) not in (0, _OWN_SHARE_BYTES):
            raise fail(
                f"entry 'own_share' must be {_OWN_SHARE_BYTES} bytes or empty, got "
                f"{len(raw('own_share'))}"
            )
        peer_records = records("peer_keys", _PEER_KEY_BYTES)
        received_records = records("received", _RECEIVED_BYTES)
        if len(raw("digest")) != hashlib.sha256().digest_size:
            raise fail(f"entry 'digest' must be 32 bytes, got {len(raw('digest'))}")
        if _state_digest(clean) != raw("digest"):
            raise fail("the digest does not match the content")

        try:
            state = cls(
                node_id,
                participants,
                threshold=int(clean["threshold"]),
                k=int(clean["k"]),
                run_id=run_id,
                round_id=round_id,
            )
        except (ConfigError, InvalidMessageError) as exc:
            raise fail(f"the recorded round parameters are invalid ({exc})") from None
        if state.k != clean["k"]:
            raise fail(f"k={clean['k']} is not the effective neighbour count {state.k}")
        if list(state.neighbours) != neighbour_ids:
            raise fail("the recorded neighbours differ from the round's neighbour graph")

        for key, present in _PRESENT[stage].items():
            if bool(raw(key)) != present:
                raise fail(
                    f"entry '{key}' must be {'set' if present else 'empty'} in stage "
                    f"'{stage.value}'"
                )
        for sk_key, pk_key in (("c_sk", "c_pk"), ("s_sk", "s_pk")):
            if raw(sk_key) and public_key_from_private(raw(sk_key)) != raw(pk_key):
                raise fail(f"'{pk_key}' does not belong to '{sk_key}'")
        max_index = state.k + 1

        def share_index(data_: bytes, what: str) -> int:
            (idx,) = _IDX.unpack_from(data_)
            if not 1 <= idx <= max_index:
                raise fail(f"Shamir index {idx} of {what} is outside 1..{max_index}")
            return int(idx)

        own_share: tuple[int, bytes, bytes] | None = None
        if raw("own_share"):
            own = raw("own_share")
            off = _IDX.size
            own_share = (
                share_index(own, "the own share"),
                own[off : off + SECRET_BYTES],
                own[off + SECRET_BYTES :],
            )
        peer_keys: dict[int, tuple[bytes, bytes]] = {}
        for rec in peer_records:
            (peer,) = _U64.unpack_from(rec)
            if peer not in state.neighbours or peer in peer_keys:
                raise fail(f"peer key entry for node {peer}, which is not a distinct neighbour")
            off = _U64.size
            peer_keys[peer] = (rec[off : off + KEY_BYTES], rec[off + KEY_BYTES :])
        received: dict[int, tuple[int, bytes, bytes]] = {}
        for rec in received_records:
            (sender,) = _U64.unpack_from(rec)
            if sender not in peer_keys or sender in received:
                raise fail(
                    f"received shares from node {sender}, which is not a distinct "
                    "neighbour with recorded keys"
                )
            off = _U64.size + _IDX.size
            received[sender] = (
                share_index(rec[_U64.size :], f"the share from node {sender}"),
                rec[off : off + SECRET_BYTES],
                rec[off + SECRET_BYTES :],
            )
        if peer_keys and stage not in (ClientStage.SHARED, ClientStage.MASKED):
            raise fail(f"peer keys are recorded in stage '{stage.value}'")
        if received and stage is not ClientStage.MASKED:
            raise fail(f"received shares are recorded in stage '{stage.value}'")

        state.stage = stage
        state._c_sk = raw("c_sk") or None
        state._c_pk = raw("c_pk") or None
        state._s_sk = raw("s_sk") or None
        state._s_pk = raw("s_pk") or None
        state._b = raw("b") or None
        state._own_share = own_share
        state._peer_keys = peer_keys
        state._received = received
        return state
