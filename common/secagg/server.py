"""Server side of SecAgg+ as a pure state machine (one instance per round).

Every stage takes all replies of that stage at once, checks each one on its
own, and returns what to send next together with ``rejected``: ``node ->
reason`` for each reply it had to discard. A bad reply drops its sender only;
:class:`ProtocolAbort` is raised only when too few sites remain for the round
to finish (the caller abandons the round cleanly).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .crypto import (
    KEY_BYTES,
    agree,
    check_proof_of_possession,
    check_uint64,
    decrypt_share,
    public_key_from_private,
    validate_public_key,
)
from .errors import ConfigError, InvalidMessageError, ProtocolAbort, SecAggError, StageError
from .identity import PublicKey, load_public_blob, verify_signature
from .messages import (
    NO_CIPHERTEXT,
    PURPOSE_ADVERT,
    PURPOSE_SHARES,
    PURPOSE_VIEW,
    Advert,
    RoundContext,
    ShareMessage,
    View,
    ciphertext_digest,
    seed_commitment,
    share_commitment,
)
from .prg import MASK_DTYPE, apply_masks
from .protocol import (
    B_SHARES,
    PURPOSE_MASK,
    PURPOSE_SHARE,
    SEEDS,
    SHARE_CIPHERTEXT_BYTES,
    SK_SHARES,
    ServerStage,
    decode_share_payload,
)
from .shamir import SECRET_BYTES, combine_shares

__all__ = ["ServerState", "Rejected"]

logger = logging.getLogger(__name__)

Rejected = dict[int, str]
"""``node -> reason`` of the replies a stage discarded."""


@dataclass(frozen=True)
class _Site:
    advert: Advert
    key: PublicKey  # the site's public signing key
    fingerprint: bytes


class ServerState:
    """Per-round SecAgg+ state of the server.

    Stages, in order, each callable once (:class:`StageError` otherwise):
    :meth:`collect_adverts`, :meth:`collect_shares`, :meth:`collect_masked`,
    :meth:`collect_signatures`, :meth:`finalize`.

    Parameters
    ----------
    ctx : RoundContext
        The round's public parameters.
    challenge_private : bytes
        Private half of ``ctx.challenge`` (to check proofs of possession).
    vector_length : int
        Length of every masked input vector.

    Raises
    ------
    ConfigError
        If the challenge key does not match or ``vector_length`` is invalid.
    """

    def __init__(self, ctx: RoundContext, *, challenge_private: bytes, vector_length: int) -> None:
        if public_key_from_private(challenge_private) != ctx.challenge:
            raise ConfigError("the challenge private key does not belong to the round's challenge")
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 0:
            raise ConfigError(
                f"vector_length must be a non-negative integer, got {vector_length!r}; "
                "the round cannot be configured"
            )
        self.ctx = ctx
        self.threshold = ctx.threshold
        self.k = ctx.k
        self.graph = ctx.graph
        self.node_ids: tuple[int, ...] = ctx.participants
        self.vector_length = vector_length
        self._challenge_private = bytes(challenge_private)
        self.stage = ServerStage.COLLECT_KEYS
        self._sites: dict[int, _Site] = {}
        self._bundles: dict[int, frozenset[int]] = {}  # who each node sent shares to
        self._messages: dict[int, ShareMessage] = {}
        self._cts: dict[tuple[int, int], bytes] = {}  # (sender, receiver) -> ciphertext
        self._routed_from: dict[int, frozenset[int]] = {}  # each node's masking neighbours
        self._complained: dict[int, frozenset[int]] = {}  # receiver -> senders it complained of
        self._acc: np.ndarray | None = None
        self._view_body = b""
        self._signers: frozenset[int] = frozenset()
        self.survivors: list[int] = []
        self.dropped: list[int] = []

    # ------------------------------------------------------------------ helpers
    def _require(self, stage: ServerStage, action: str) -> None:
        if self.stage is not stage:
            raise StageError(
                f"server cannot {action} in stage '{self.stage.value}' (expected "
                f"'{stage.value}'); the call is ignored and the round state is "
                "unchanged"
            )

    def _check_alive(self, count: int, stage: str, answered: int | None = None) -> None:
        if count < self.threshold:
            left = (
                f" ({answered} answered, {answered - count} of them left out for too few live share holders)"
                if answered is not None and answered != count
                else ""
            )
            raise ProtocolAbort(
                f"{stage} stage: only {count} sites remain{left} but the threshold "
                f"is {self.threshold}; the aggregate cannot be recovered and the "
                "round is abandoned"
            )

    def _prune(
        self, alive: set[int], holders: Mapping[int, frozenset[int]] | None, stage: str, rejected: Rejected
    ) -> set[int]:
        """Largest subset in which every node has ``t`` share holders (itself included) alive."""
        alive = set(alive)
        while True:
            weak = sorted(
                i
                for i in alive
                if len(({i} | (holders[i] if holders else set(self.graph[i]))) & alive) < self.threshold
            )
            if not weak:
                return alive
            for node in weak:
                alive.discard(node)
                rejected.setdefault(
                    node,
                    f"left out at {stage}: fewer than {self.threshold} of "
                    "its share holders are still in the round",
                )
                logger.warning("%s stage: node %d has too few live share holders; left out", stage, node)

    def _participant(self, raw_id: object) -> int:
        node = check_uint64(raw_id, "node id")
        if node not in self.graph:
            raise InvalidMessageError(f"node {node} is not a participant of this round")
        return node

    # ------------------------------------------------------------------- stage 0
    def _check_advert(self, node: int, data: object) -> _Site:
        advert, ctx_digest = Advert.decode(data)
        if ctx_digest != self.ctx.digest or advert.node != node:
            raise InvalidMessageError("its advertisement is for another round, cohort or node")
        try:
            key = load_public_blob(advert.signer)
        except ConfigError as exc:
            raise InvalidMessageError(f"its signing key is unusable ({exc})") from None
        if not verify_signature(key, PURPOSE_ADVERT, advert.body(self.ctx.digest), advert.signature):  # type: ignore[arg-type]
            raise InvalidMessageError("the signature on its keys does not verify")
        if [n for n, _ in advert.recv] != sorted(self.graph[node]):
            raise InvalidMessageError("it advertised receive keys for sites other than its neighbours")
        keys = [advert.c_send, advert.s_pk, *(k for _, k in advert.recv)]
        for key_bytes in keys:
            validate_public_key(key_bytes, owner=node)
        if len(set(keys)) != len(keys):
            raise InvalidMessageError("it advertised the same public key twice")
        if not check_proof_of_possession(
            self._challenge_private, advert.s_pk, advert.pop, ctx_digest=self.ctx.digest, node=node
        ):
            raise InvalidMessageError(
                "it cannot prove it holds the private half of its mask key (a copied key?)"
            )
        return _Site(advert, key, hashlib.sha256(advert.signer).digest())

    def collect_adverts(self, adverts: Mapping[int, object]) -> tuple[dict[int, dict[int, Advert]], Rejected]:
        """Stage 0: check each advert; build each live node's bundle of neighbour adverts.

        Parameters
        ----------
        adverts : Mapping[int, object]
            ``node -> encoded Advert`` for every node that answered.

        Returns
        -------
        tuple[dict[int, dict[int, Advert]], Rejected]
            For each live node ``i`` (``U1``): ``{j: advert_j}`` over its live
            neighbours; and the rejected replies.

        Raises
        ------
        ProtocolAbort
            Fewer than ``t`` nodes remain.
        """
        self._require(ServerStage.COLLECT_KEYS, "collect adverts")
        rejected: Rejected = {}
        sites: dict[int, _Site] = {}
        for raw_id, data in adverts.items():
            try:
                node = self._participant(raw_id)
                sites[node] = self._check_advert(node, data)
            except SecAggError as exc:
                rejected[raw_id] = f"bad keys: {exc}"
        for attr, what in (("fingerprint", "signing key"), ("s_pk", "mask key")):
            owners: dict[bytes, list[int]] = {}
            for node, site in sites.items():
                value = site.fingerprint if attr == "fingerprint" else site.advert.s_pk
                owners.setdefault(value, []).append(node)
            for nodes in owners.values():
                if len(nodes) > 1:  # only a holder of the private key can have signed/proved it
                    for node in nodes:
                        del sites[node]
                        rejected[node] = (
                            f"bad keys: the same {what} as node(s) {[n for n in nodes if n != node]}"
                        )
        u1 = self._prune(set(sites), None, "advertise-keys", rejected)
        self._check_alive(len(u1), "advertise-keys", len(sites))
        self._sites = {i: sites[i] for i in u1}
        bundles = {i: {j: sites[j].advert for j in self.graph[i] if j in u1} for i in sorted(u1)}
        self._bundles = {i: frozenset(b) for i, b in bundles.items()}
        self.stage = ServerStage.COLLECT_SHARES
        logger.info("advertise-keys stage: %d/%d sites live", len(u1), len(self.graph))
        return bundles, rejected

    # ------------------------------------------------------------------- stage 1
    def _check_shares(self, sender: int, reply: object) -> tuple[ShareMessage, dict[int, bytes]]:
        try:
            data, cts = cast("tuple[Any, Any]", reply)
        except (TypeError, ValueError):
            raise InvalidMessageError("its reply is not a (share message, ciphertexts) pair") from None
        message, ctx_digest = ShareMessage.decode(data)
        site = self._sites[sender]
        if ctx_digest != self.ctx.digest or message.owner != sender:
            raise InvalidMessageError("its share message is for another round, cohort or node")
        if not verify_signature(
            site.key,
            PURPOSE_SHARES,
            message.body(self.ctx.digest),  # type: ignore[arg-type]
            message.signature,
        ):
            raise InvalidMessageError("the signature on its share message does not verify")
        holders = self.ctx.holders(sender)
        if [(e.holder, e.index) for e in message.entries] != [(h, p + 1) for p, h in enumerate(holders)]:
            raise InvalidMessageError("its share message does not list its k+1 holders in order")
        receivers = self._bundles[sender]
        if not isinstance(cts, Mapping):
            raise InvalidMessageError("its ciphertexts are not a table")
        got = {check_uint64(r, "share receiver") for r in cts}
        if got != receivers or len(got) != len(cts):
            raise InvalidMessageError(
                f"it addressed shares to {sorted(got)} but its live neighbours are {sorted(receivers)}"
            )
        out: dict[int, bytes] = {}
        for entry in message.entries:
            if entry.holder not in receivers:
                if entry.ciphertext != NO_CIPHERTEXT:
                    raise InvalidMessageError(
                        f"it lists a ciphertext for node {entry.holder}, which gets none"
                    )
                continue
            ct = cts[entry.holder]
            if not isinstance(ct, (bytes, bytearray)) or len(ct) != SHARE_CIPHERTEXT_BYTES:
                raise InvalidMessageError(
                    f"its ciphertext for node {entry.holder} is not {SHARE_CIPHERTEXT_BYTES} bytes"
                )
            if ciphertext_digest(bytes(ct)) != entry.ciphertext:
                raise InvalidMessageError(f"its ciphertext for node {entry.holder} is not the one it signed")
            out[entry.holder] = bytes(ct)
        return message, out

    def collect_shares(
        self, shares: Mapping[int, object]
    ) -> tuple[dict[int, dict[int, tuple[bytes, bytes]]], Rejected]:
        """Stage 1: check each share message and route the ciphertexts.

        Parameters
        ----------
        shares : Mapping[int, object]
            ``sender -> (encoded ShareMessage, {receiver: ciphertext})``.

        Returns
        -------
        tuple[dict[int, dict[int, tuple[bytes, bytes]]], Rejected]
            For each live node ``i`` (``U2``): ``{sender: (encoded share
            message, ciphertext for i)}``; its masking neighbours are the keys.

        Raises
        ------
        ProtocolAbort
            Fewer than ``t`` nodes remain.
        """
        self._require(ServerStage.COLLECT_SHARES, "collect shares")
        rejected: Rejected = {}
        checked: dict[int, tuple[ShareMessage, dict[int, bytes]]] = {}
        for raw_id, reply in shares.items():
            try:
                sender = self._participant(raw_id)
                if sender not in self._sites:
                    raise InvalidMessageError("it sent shares without live keys in this round")
                checked[sender] = self._check_shares(sender, reply)
            except SecAggError as exc:
                rejected[raw_id] = f"bad shares: {exc}"
        u2 = self._prune(set(checked), self._bundles, "share-keys", rejected)
        self._check_alive(len(u2), "share-keys", len(checked))
        routed: dict[int, dict[int, tuple[bytes, bytes]]] = {i: {} for i in sorted(u2)}
        for sender in sorted(u2):
            message, cts = checked[sender]
            self._messages[sender] = message
            encoded = message.encode(self.ctx.digest)
            for receiver, ct in cts.items():
                self._cts[(sender, receiver)] = ct
                if receiver in u2:
                    routed[receiver][sender] = (encoded, ct)
        self._routed_from = {i: frozenset(v) for i, v in routed.items()}
        self.stage = ServerStage.COLLECT_MASKED
        logger.info("share-keys stage: %d sites live", len(u2))
        return routed, rejected

    # ------------------------------------------------------------------- stage 2
    def _share_is_valid(self, sender: int, receiver: int, receive_key: bytes) -> bool:
        """Whether ``sender``'s ciphertext to ``receiver`` opens to the shares it committed to."""
        try:
            key = agree(
                receive_key,
                self._sites[sender].advert.c_send,
                run_id=self.ctx.run_id,
                round_id=self.ctx.round_id,
                node_a=receiver,
                node_b=sender,
                purpose=PURPOSE_SHARE,
            )
            payload = decrypt_share(
                key,
                self._cts[(sender, receiver)],
                sender=sender,
                receiver=receiver,
                run_id=self.ctx.run_id,
                round_id=self.ctx.round_id,
            )
            idx, b_sh, sk_sh = decode_share_payload(payload, sender=sender, receiver=receiver)
        except SecAggError:
            return False
        entry = self._messages[sender].entry(receiver)
        return (
            entry is not None
            and idx == entry.index
            and share_commitment(self.ctx, sender, idx, b"b", b_sh) == entry.commit_b
            and share_commitment(self.ctx, sender, idx, b"s", sk_sh) == entry.commit_sk
        )

    def _check_masked(self, node: int, reply: object) -> tuple[np.ndarray, dict[int, bytes]]:
        try:
            y, complaints = cast("tuple[Any, Any]", reply)
        except (TypeError, ValueError):
            raise InvalidMessageError("its reply is not a (masked vector, complaints) pair") from None
        if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.shape != (self.vector_length,):
            desc = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
            raise InvalidMessageError(f"its masked input is {desc}, expected uint32 ({self.vector_length},)")
        if not isinstance(complaints, Mapping):
            raise InvalidMessageError("its complaints are not a table")
        out: dict[int, bytes] = {}
        for raw_sender, key in complaints.items():
            sender = check_uint64(raw_sender, "complaint subject")
            if sender not in self._routed_from[node]:
                raise InvalidMessageError(f"it complains about node {sender}, which sent it nothing")
            advertised = self._sites[node].advert.recv_key(sender)
            if (
                not isinstance(key, (bytes, bytearray))
                or len(key) != KEY_BYTES
                or public_key_from_private(bytes(key)) != advertised
            ):
                raise InvalidMessageError(
                    f"its complaint about node {sender} does not carry its own receive key for that node"
                )
            out[sender] = bytes(key)
        return y, out

    def collect_masked(self, replies: Mapping[int, object]) -> tuple[bytes, Rejected]:
        """Stage 2: check masked inputs, judge complaints, fix the survivor view.

        A complaint (the complainer's receive key for one sender) lets the
        server open that one ciphertext: if it does not hold the shares its
        sender signed commitments to, the sender is dropped; if it does, the
        complainer lied and is dropped. Then every survivor must keep ``t`` of
        its share holders among the survivors (others are moved to dropped).

        Parameters
        ----------
        replies : Mapping[int, object]
            ``node -> (masked uint32 vector, {sender: receive key})``.

        Returns
        -------
        tuple[bytes, Rejected]
            The encoded :class:`View` (survivors ``U3`` and dropped ``U2 \\
            U3``, with key fingerprints) to send every survivor, and the
            rejected replies.

        Raises
        ------
        ProtocolAbort
            Fewer than ``t`` survivors.
        """
        self._require(ServerStage.COLLECT_MASKED, "collect masked inputs")
        rejected: Rejected = {}
        # One pass adds every well-formed vector (the replies may be produced one at a
        # time); a site left out afterwards has its vector subtracted again.
        acc = np.zeros(self.vector_length, dtype=MASK_DTYPE)
        good: dict[int, dict[int, bytes]] = {}
        for raw_id, reply in replies.items():
            try:
                node = self._participant(raw_id)
                if node not in self._routed_from:
                    raise InvalidMessageError("it sent a masked input without completing key sharing")
                y, good[node] = self._check_masked(node, reply)
            except SecAggError as exc:
                rejected[raw_id] = f"bad masked input: {exc}"
                continue
            np.add(acc, y, out=acc)
            del y
        guilty: Rejected = {}
        for receiver, complaints in sorted(good.items()):
            for sender, key in sorted(complaints.items()):
                if self._share_is_valid(sender, receiver, key):
                    guilty[receiver] = (
                        f"complained about node {sender}'s share, which is valid (a false complaint)"
                    )
                else:
                    guilty.setdefault(
                        sender, f"its share for node {receiver} does not open to what it committed to"
                    )
        rejected.update(guilty)
        self._complained = {r: frozenset(c) for r, c in good.items()}
        u3 = self._prune(set(good) - set(guilty), self._bundles, "masked-input", rejected)
        self._check_alive(len(u3), "masked-input", len(good))
        for node in sorted(set(good) - u3):
            np.subtract(acc, replies[node][0], out=acc)  # type: ignore[index]
        self._acc = acc
        self.survivors = sorted(u3)
        self.dropped = sorted(set(self._routed_from) - u3)
        fp = {i: s.fingerprint for i, s in self._sites.items()}
        view = View({i: fp[i] for i in self.survivors}, {j: fp[j] for j in self.dropped})
        self._view_body = view.body(self.ctx.digest)
        self.stage = ServerStage.COLLECT_SIGNATURES
        logger.info("masked-input stage: %d survivors, %d dropped", len(u3), len(self.dropped))
        return self._view_body, rejected

    # ------------------------------------------------------------------- stage 3
    def collect_signatures(
        self, signatures: Mapping[int, object]
    ) -> tuple[dict[int, dict[int, bytes]], Rejected]:
        """Stage 3: check each survivor's signature on the view; pick what each signer needs.

        Parameters
        ----------
        signatures : Mapping[int, object]
            ``node -> signature of the view``.

        Returns
        -------
        tuple[dict[int, dict[int, bytes]], Rejected]
            For each valid signer: the valid signatures of the signers within two
            hops of it (the neighbourhoods of itself and its neighbours), which
            is what it checks before revealing; and the rejected replies.

        Raises
        ------
        ProtocolAbort
            Fewer than ``t`` valid signatures.
        """
        self._require(ServerStage.COLLECT_SIGNATURES, "collect view signatures")
        rejected: Rejected = {}
        valid: dict[int, bytes] = {}
        for raw_id, sig in signatures.items():
            try:
                node = self._participant(raw_id)
                if node not in self.survivors:
                    raise InvalidMessageError("it is not a survivor")
                if not isinstance(sig, (bytes, bytearray)) or not verify_signature(
                    self._sites[node].key, PURPOSE_VIEW, self._view_body, sig
                ):
                    raise InvalidMessageError("its signature on the survivor view does not verify")
                valid[node] = bytes(sig)
            except SecAggError as exc:
                rejected[raw_id] = f"bad view signature: {exc}"
        self._check_alive(len(valid), "consistency-check")
        self._signers = frozenset(valid)
        relays = {}
        for node in sorted(valid):
            ball = set().union(*(self.ctx.neighbourhood(w) for w in self.ctx.neighbourhood(node)))
            relays[node] = {v: valid[v] for v in sorted(ball & set(valid))}
        self.stage = ServerStage.COLLECT_UNMASK
        return relays, rejected

    @property
    def view_body(self) -> bytes:
        """The encoded survivor view of this round (after :meth:`collect_masked`)."""
        return self._view_body

    # ------------------------------------------------------------------- stage 4
    def _check_unmask(self, responder: int, reply: object) -> tuple[dict, dict, dict]:
        if not isinstance(reply, Mapping) or set(reply) != {B_SHARES, SK_SHARES, SEEDS}:
            raise InvalidMessageError(f"its reply must hold exactly {B_SHARES}, {SK_SHARES}, {SEEDS}")
        survivors, dropped = set(self.survivors), set(self.dropped)
        holds = self._routed_from[responder] - self._complained.get(responder, frozenset())
        allowed = {
            B_SHARES: (holds & survivors) | {responder},
            SK_SHARES: holds & dropped,
            SEEDS: self._routed_from[responder] & dropped,
        }
        out: dict[str, dict[int, object]] = {}
        for part, owners in allowed.items():
            table = reply[part]
            if not isinstance(table, Mapping):
                raise InvalidMessageError(f"its {part} are not a table")
            out[part] = {}
            for raw_owner, value in table.items():
                owner = check_uint64(raw_owner, "share owner")
                if owner not in owners:
                    raise InvalidMessageError(
                        f"it sent {part} of node {owner}, which it does not hold or which was not asked for"
                    )
                if part == SEEDS:
                    if not isinstance(value, (bytes, bytearray)) or len(value) != KEY_BYTES:
                        raise InvalidMessageError(f"its mask seed with node {owner} is not {KEY_BYTES} bytes")
                    out[part][owner] = bytes(value)
                    continue
                try:
                    idx, share = value
                except (TypeError, ValueError):
                    raise InvalidMessageError(
                        f"its share of node {owner} is not an (index, share) pair"
                    ) from None
                kind, what = (b"b", "self-mask") if part == B_SHARES else (b"s", "mask-key")
                entry = self._messages[owner].entry(responder)
                if (
                    entry is None
                    or not isinstance(idx, int)
                    or isinstance(idx, bool)
                    or idx != entry.index
                    or not isinstance(share, (bytes, bytearray))
                    or len(share) != SECRET_BYTES
                    or share_commitment(self.ctx, owner, idx, kind, bytes(share))
                    != (entry.commit_b if kind == b"b" else entry.commit_sk)
                ):
                    raise InvalidMessageError(
                        f"its {what} share of node {owner} does not match what node {owner} committed to"
                    )
                out[part][owner] = (idx, bytes(share))
        return out[B_SHARES], out[SK_SHARES], out[SEEDS]

    def _reconstruct(self, owner: int, shares: list[tuple[int, bytes]], what: str) -> bytes:
        """Rebuild ``owner``'s self-mask seed or mask key from committed shares.

        The result must match the dealer's own commitment (the seed commitment
        it signed, or its mask public key). Each share already matches its
        commitment, so a mismatch means the dealer dealt shares off one
        polynomial; other subsets of ``t`` are then tried (a bounded number).
        """
        if len(shares) < self.threshold:
            raise ProtocolAbort(
                f"unmask stage: only {len(shares)} valid {what} shares of node "
                f"{owner} arrived but the threshold is {self.threshold}; its mask "
                "cannot be removed and the round is abandoned"
            )
        for subset in itertools.islice(itertools.combinations(sorted(shares), self.threshold), 32):
            secret = combine_shares(subset, self.threshold)
            if what == "self-mask":
                if seed_commitment(self.ctx, owner, secret) == self._messages[owner].seed:
                    return secret
            elif public_key_from_private(secret) == self._sites[owner].advert.s_pk:
                return secret
        raise ProtocolAbort(
            f"unmask stage: the {what} shares node {owner} dealt do not rebuild "
            f"the secret it committed to (each matches its own commitment, so "
            f"node {owner} cheated); its mask cannot be removed and the round is "
            "abandoned"
        )

    def finalize(self, replies: Mapping[int, object]) -> tuple[np.ndarray, Rejected]:
        """Stage 4: check revealed shares against their commitments, remove every mask.

        Self-mask seeds of the survivors are rebuilt from ``t`` committed shares;
        the pairwise masks between survivors and dropped sites are removed with
        the dropped site's mask key (rebuilt from committed shares and checked
        against its public key) or, failing that, with the seeds the survivors
        revealed for their own masks with it.

        Parameters
        ----------
        replies : Mapping[int, object]
            ``responder -> {"b_shares": {owner: (index, share)}, "sk_shares":
            {...}, "seeds": {owner: seed}}`` from the signers that answered.

        Returns
        -------
        tuple[numpy.ndarray, Rejected]
            ``uint32`` vector ``sum_{i in survivors} x_i mod 2**32``, and the
            replies that were discarded (a share that does not match its
            commitment, a wrong seed, a share the responder cannot hold).

        Raises
        ------
        ProtocolAbort
            A mask cannot be removed (too few valid shares, or a dealer that
            cheated).
        """
        self._require(ServerStage.COLLECT_UNMASK, "finalize")
        rejected: Rejected = {}
        good: dict[int, tuple[dict, dict, dict]] = {}
        for raw_id, reply in replies.items():
            try:
                node = self._participant(raw_id)
                if node not in self._signers:
                    raise InvalidMessageError("it did not sign the survivor view")
                good[node] = self._check_unmask(node, reply)
            except SecAggError as exc:
                rejected[raw_id] = f"bad unmask reply: {exc}"
        b_shares: dict[int, list[tuple[int, bytes]]] = {i: [] for i in self.survivors}
        sk_shares: dict[int, list[tuple[int, bytes]]] = {j: [] for j in self.dropped}
        for b_part, sk_part, _ in good.values():
            for owner, share in b_part.items():
                b_shares[owner].append(share)
            for owner, share in sk_part.items():
                sk_shares[owner].append(share)
        seeds_b = {i: self._reconstruct(i, s, "self-mask") for i, s in b_shares.items()}
        keys_sk: dict[int, bytes] = {}
        for j, shares in sk_shares.items():
            try:
                keys_sk[j] = self._reconstruct(j, shares, "mask-key")
            except ProtocolAbort as exc:
                logger.info("dropped node %d: %s; using the survivors' seeds instead", j, exc)
        assert self._acc is not None
        total = self._acc.copy()
        masks = [(seeds_b[i], -1) for i in self.survivors]
        for j in self.dropped:
            for i in self.survivors:
                if j not in self._routed_from[i]:
                    continue
                revealed = good[i][2].get(j) if i in good else None
                if j in keys_sk:
                    seed = agree(
                        keys_sk[j],
                        self._sites[i].advert.s_pk,
                        run_id=self.ctx.run_id,
                        round_id=self.ctx.round_id,
                        node_a=j,
                        node_b=i,
                        purpose=PURPOSE_MASK,
                    )
                    if revealed is not None and revealed != seed:
                        rejected[i] = f"bad unmask reply: it revealed a wrong mask seed with node {j}"
                elif revealed is not None:
                    seed = revealed
                else:
                    raise ProtocolAbort(
                        f"unmask stage: the mask between survivor {i} and dropped node {j} cannot "
                        f"be removed (node {i} did not reveal it and node {j}'s mask key cannot "
                        "be rebuilt); the round is abandoned"
                    )
                # Survivor i added +PRG(s_ij) if j > i and subtracted it if j < i.
                masks.append((seed, -1 if j > i else 1))
        apply_masks(total, masks)
        self.stage = ServerStage.DONE
        self._acc = None
        logger.info(
            "unmask stage: recovered the sum of %d inputs (%d dropouts corrected)",
            len(self.survivors),
            len(self.dropped),
        )
        return total, rejected
