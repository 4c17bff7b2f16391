"""Client side of SecAgg+ as a pure state machine (one instance per node per round).

The site trusts only its own signing key and its roster; everything the server
relays is checked against them. What the site refuses, and why:

* a key bundle entry not signed by a roster key for this round (a Sybil or a
  substituted key), or routed shares whose signed digests do not match;
* a survivor view (stage 3) that lists it as dropped, lists a site twice,
  names a neighbour that never sent it shares, omits one that did, leaves fewer
  than ``t`` of its own share holders alive, names a key outside its roster or
  one key for two sites, or has fewer survivors than its minimum cohort;
* an unmask request for a view other than the one it signed, or without ``t``
  valid signatures on that view from the neighbourhood of every site whose
  secret it would help reveal; and a second request (the state allows one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .crypto import (
    KEY_BYTES,
    agree,
    check_uint64,
    decrypt_share,
    encrypt_share,
    generate_key_pair,
    proof_of_possession,
    public_key_from_private,
    validate_public_key,
)
from .errors import (
    ConfigError,
    InvalidMessageError,
    ProtocolAbort,
    SecAggError,
    StageError,
    UnmaskRefusedError,
)
from .identity import Identity, Roster, fingerprint_text
from .messages import (
    NO_CIPHERTEXT,
    PURPOSE_ADVERT,
    PURPOSE_SHARES,
    PURPOSE_VIEW,
    Advert,
    RoundContext,
    ShareEntry,
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
    SK_SHARES,
    ClientStage,
    decode_share_payload,
    encode_share_payload,
)
from .shamir import SECRET_BYTES, split_secret

__all__ = ["ClientState", "OpenedShares", "StateFormatError", "STATE_FORMAT", "STATE_VERSION", "state_digest"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "fedseal.secagg.client-state"
"""Value of the ``"format"`` entry of :meth:`ClientState.export_state`."""
STATE_VERSION = 2
"""Value of the ``"version"`` entry of :meth:`ClientState.export_state`."""
STATE_LABEL = b"fedseal-secagg-v2 client-state\x00"
"""Domain label of the exported state's digest."""

UnmaskReply = dict[str, dict[int, Any]]


class StateFormatError(InvalidMessageError):
    """An exported :class:`ClientState` is malformed, corrupted or of another version.

    Raised by :meth:`ClientState.restore_state`. The node cannot continue the
    round from that record; it should drop out (the protocol tolerates it).
    """


def state_digest(state: bytes) -> bytes:
    """``SHA-256(STATE_LABEL || state)``: detects accidental corruption of a stored state."""
    return hashlib.sha256(STATE_LABEL + state).digest()


def _refuse(node: int, why: str) -> UnmaskRefusedError:
    return UnmaskRefusedError(
        f"node {node} refuses to reveal any share: {why}; the server "
        "is misbehaving (or the round is broken) and this site will not "
        "help finish it"
    )


@dataclass(frozen=True)
class OpenedShares:
    """Stage 2's routed shares, opened and checked by :meth:`ClientState.open_shares`."""

    opener: bytes
    """A token of the state object that opened them; :meth:`ClientState.mask` takes only its own."""
    received: Mapping[int, tuple[int, bytes, bytes] | None]
    """``sender -> (index, b share, sk share)``, ``None`` where the share was bad."""
    complaints: Mapping[int, bytes]
    """``sender -> receive private key`` for each bad share."""


class ClientState:
    """Per-round SecAgg+ state of one site.

    Methods must be called in order: :meth:`advertise_keys`, :meth:`share_keys`,
    :meth:`masked_input` (or :meth:`open_shares` then :meth:`mask`), :meth:`sign_view`,
    :meth:`unmask`; each once. A call out of order raises :class:`StageError`;
    a call that raises leaves the state unchanged.

    Parameters
    ----------
    node_id : int
        This node's id (unsigned 64-bit).
    ctx : RoundContext
        The round's public parameters (participants, ``k``, ``t``, challenge).
    identity : Identity
        This site's long-term signing key.
    roster : Roster
        The signing keys of the sites this site accepts as fellow members.
    min_survivors : int, optional
        Fewest survivors a sum may cover for this site to help unmask it (its
        minimum cohort), default 1.

    Raises
    ------
    ConfigError
        If ``node_id`` is not a participant or ``min_survivors`` is not positive.
    """

    def __init__(
        self, node_id: int, ctx: RoundContext, *, identity: Identity, roster: Roster, min_survivors: int = 1
    ) -> None:
        self.node_id = check_uint64(node_id, "node_id")
        if self.node_id not in ctx.graph:
            raise ConfigError(
                f"node {self.node_id} is not in the round's participant list; it "
                "cannot take part in this round"
            )
        if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) or min_survivors < 1:
            raise ConfigError(f"min_survivors must be a positive integer, got {min_survivors!r}")
        self.ctx = ctx
        self.identity = identity
        self.roster = roster
        self.min_survivors = min_survivors
        self.threshold = ctx.threshold
        self.k = ctx.k
        self.participants = frozenset(ctx.participants)
        self.neighbours: tuple[int, ...] = tuple(ctx.graph[self.node_id])
        self.stage = ClientStage.INIT
        self._c_send_sk: bytes | None = None
        self._s_sk: bytes | None = None
        self._recv_sk: dict[int, bytes] = {}
        self._b: bytes | None = None
        self._own_share: tuple[int, bytes, bytes] | None = None
        self._bundle: dict[int, Advert] = {}
        self._received: dict[int, tuple[int, bytes, bytes] | None] = {}
        self._seeds: dict[int, bytes] = {}
        self._view_digest: bytes = b""
        self._token = os.urandom(16)  # names this object's OpenedShares (never exported)

    # ------------------------------------------------------------------ helpers
    def _require(self, stage: ClientStage, action: str) -> None:
        if self.stage is not stage:
            raise StageError(
                f"node {self.node_id} cannot {action} in stage '{self.stage.value}' (expected "
                f"'{stage.value}'); the call is ignored and the round state is unchanged"
            )

    def _agree(self, private: bytes, peer_pk: bytes, peer: int, purpose: bytes) -> bytes:
        return agree(
            private,
            peer_pk,
            run_id=self.ctx.run_id,
            round_id=self.ctx.round_id,
            node_a=self.node_id,
            node_b=peer,
            purpose=purpose,
        )

    def _check_advert(self, node: int, advert: object) -> Advert:
        """Verify one relayed advert against this site's roster; raise if it is not acceptable."""
        if not isinstance(advert, Advert) or advert.node != node:
            raise InvalidMessageError(
                f"the key bundle's entry for node {node} is not that node's "
                "advertisement; this site will not share its secrets"
            )
        fp = hashlib.sha256(advert.signer).digest()
        if fp not in self.roster or self.roster.blob(fp) != advert.signer:
            raise InvalidMessageError(
                f"node {node}'s keys are signed by {fingerprint_text(fp)}, which is not in "
                "this site's roster of accepted sites: the server relayed a site this site "
                "does not accept (add its .pub line to the peers file if it should be a member)"
            )
        if not self.roster.verify(fp, PURPOSE_ADVERT, advert.body(self.ctx.digest), advert.signature):
            raise InvalidMessageError(
                f"the signature on node {node}'s keys does not verify for this round: the server "
                "altered or replayed them; this site will not share its secrets"
            )
        if [n for n, _ in advert.recv] != sorted(self.ctx.graph[node]):
            raise InvalidMessageError(
                f"node {node} advertised receive keys for sites other than its neighbours"
            )
        # The keys this site will use with that neighbour (the server checked them all).
        for name, key in (
            ("c_send", advert.c_send),
            ("s_pk", advert.s_pk),
            ("receive key", advert.recv_key(self.node_id)),
        ):
            validate_public_key(key, owner=node, name=name)
        return advert

    def _share_message_signed(self, sender: int, message: ShareMessage) -> bool:
        fp = hashlib.sha256(self._bundle[sender].signer).digest()
        return self.roster.verify(fp, PURPOSE_SHARES, message.body(self.ctx.digest), message.signature)

    # ------------------------------------------------------------------- stages
    def advertise_keys(self) -> Advert:
        """Stage 0: make the round's X25519 keys and sign them.

        Returns
        -------
        Advert
            The send key, the mask key (with its proof of possession for the
            server's challenge), one receive key per neighbour, signed.
        """
        self._require(ClientStage.INIT, "advertise keys")
        c_send_sk, c_send_pk = generate_key_pair()
        s_sk, s_pk = generate_key_pair()
        recv_sk, recv = {}, []
        for nbr in self.neighbours:
            recv_sk[nbr], pk = generate_key_pair()
            recv.append((nbr, pk))
        pop = proof_of_possession(s_sk, self.ctx.challenge, ctx_digest=self.ctx.digest, node=self.node_id)
        unsigned = Advert(self.node_id, self.identity.blob, c_send_pk, s_pk, tuple(recv), pop)
        advert = Advert(
            self.node_id,
            self.identity.blob,
            c_send_pk,
            s_pk,
            tuple(recv),
            pop,
            self.identity.sign(PURPOSE_ADVERT, unsigned.body(self.ctx.digest)),
        )
        self._c_send_sk, self._s_sk, self._recv_sk = c_send_sk, s_sk, recv_sk
        self.stage = ClientStage.ADVERTISED
        return advert

    def share_keys(self, bundle: Mapping[int, Advert]) -> tuple[ShareMessage, dict[int, bytes]]:
        """Stage 1: Shamir-share the self-mask seed and mask key, commit, encrypt.

        A fresh seed ``b`` and the mask key are each split ``t``-of-``(k+1)``
        among :meth:`RoundContext.holders` (holder ``p`` gets index ``p + 1``).
        Each neighbour present in ``bundle`` gets its pair of shares encrypted
        under ``agree(c_send_sk, its receive key for this site)``; the message
        signs every share's commitment and every ciphertext's digest, so a
        holder that receives a bad share can prove who made it.

        Parameters
        ----------
        bundle : Mapping[int, Advert]
            The live neighbours' adverts as relayed by the server. Each must be
            signed for this round by a key in this site's roster.

        Returns
        -------
        tuple[ShareMessage, dict[int, bytes]]
            The signed share message and ``receiver -> ciphertext``.

        Raises
        ------
        InvalidMessageError
            An entry is not a neighbour's valid advert signed by a roster key,
            or two entries share a signing key (one key, one site).
        ProtocolAbort
            Fewer than ``t`` holders are alive.
        StageError
            If called out of order.
        """
        self._require(ClientStage.ADVERTISED, "share keys")
        peers: dict[int, Advert] = {}
        signers = {self.identity.fingerprint: self.node_id}
        for raw_id, advert in bundle.items():
            node = check_uint64(raw_id, "node id in key bundle")
            if node not in self.neighbours:
                raise InvalidMessageError(
                    f"key bundle contains node {node}, which is not a neighbour of node "
                    f"{self.node_id} in this round; this site will not share its secrets"
                )
            peers[node] = self._check_advert(node, advert)
            fp = hashlib.sha256(advert.signer).digest()
            if fp in signers:
                raise InvalidMessageError(
                    f"nodes {signers[fp]} and {node} are signed by the same key "
                    f"{fingerprint_text(fp)}: one key may stand for one site only (a Sybil)"
                )
            signers[fp] = node
        holders = self.ctx.holders(self.node_id)
        if len(peers) + 1 < self.threshold:
            raise ProtocolAbort(
                f"share-keys stage: node {self.node_id} has {len(peers) + 1} live share holders "
                f"but the threshold is {self.threshold}; its masks could never be removed, so "
                "it drops out of this round"
            )
        assert self._c_send_sk is not None and self._s_sk is not None
        b = os.urandom(KEY_BYTES)
        b_shares = split_secret(b, self.threshold, len(holders))
        sk_shares = split_secret(self._s_sk, self.threshold, len(holders))
        entries, out = [], {}
        own: tuple[int, bytes, bytes] | None = None
        for holder, (idx, b_sh), (_, sk_sh) in zip(holders, b_shares, sk_shares, strict=True):
            digest = NO_CIPHERTEXT
            if holder == self.node_id:
                own = (idx, b_sh, sk_sh)
            elif holder in peers:
                recv_pk = peers[holder].recv_key(self.node_id)
                assert recv_pk is not None  # checked in _check_advert
                key = self._agree(self._c_send_sk, recv_pk, holder, PURPOSE_SHARE)
                out[holder] = encrypt_share(
                    key,
                    encode_share_payload(self.node_id, holder, idx, b_sh, sk_sh),
                    sender=self.node_id,
                    receiver=holder,
                    run_id=self.ctx.run_id,
                    round_id=self.ctx.round_id,
                )
                digest = ciphertext_digest(out[holder])
            entries.append(
                ShareEntry(
                    holder,
                    idx,
                    share_commitment(self.ctx, self.node_id, idx, b"b", b_sh),
                    share_commitment(self.ctx, self.node_id, idx, b"s", sk_sh),
                    digest,
                )
            )
        seed = seed_commitment(self.ctx, self.node_id, b)
        unsigned = ShareMessage(self.node_id, seed, tuple(entries))
        message = ShareMessage(
            self.node_id,
            seed,
            tuple(entries),
            self.identity.sign(PURPOSE_SHARES, unsigned.body(self.ctx.digest)),
        )
        self._b, self._own_share, self._bundle = b, own, peers
        self._c_send_sk = None
        self.stage = ClientStage.SHARED
        return message, out

    def _open_share(self, sender: int, message: object, ciphertext: object) -> tuple[int, bytes, bytes]:
        """Decrypt and check one routed share; raise ShareDecryptionError/InvalidMessageError."""
        if not isinstance(message, ShareMessage) or message.owner != sender:
            raise InvalidMessageError(f"the share message routed as node {sender}'s is not its own")
        entry = message.entry(self.node_id)
        expected = self.ctx.index_of(sender, self.node_id)
        if entry is None or entry.index != expected:
            raise InvalidMessageError(
                f"node {sender}'s share message has no entry with index {expected} for node {self.node_id}"
            )
        if not isinstance(ciphertext, (bytes, bytearray)) or entry.ciphertext != ciphertext_digest(
            bytes(ciphertext)
        ):
            raise UnmaskRefusedError(
                f"the ciphertext routed to node {self.node_id} as node {sender}'s is not the one "
                f"node {sender} signed: the server altered it; this site leaves the round"
            )
        key = self._agree(self._recv_sk[sender], self._bundle[sender].c_send, sender, PURPOSE_SHARE)
        payload = decrypt_share(
            key,
            bytes(ciphertext),
            sender=sender,
            receiver=self.node_id,
            run_id=self.ctx.run_id,
            round_id=self.ctx.round_id,
        )
        idx, b_sh, sk_sh = decode_share_payload(payload, sender=sender, receiver=self.node_id)
        if idx != expected:
            raise InvalidMessageError(
                f"node {sender}'s share for node {self.node_id} carries index {idx}, expected {expected}"
            )
        if (
            share_commitment(self.ctx, sender, idx, b"b", b_sh) != entry.commit_b
            or share_commitment(self.ctx, sender, idx, b"s", sk_sh) != entry.commit_sk
        ):
            raise InvalidMessageError(
                f"node {sender}'s shares for node {self.node_id} do not match the commitments it signed"
            )
        return idx, b_sh, sk_sh

    def open_shares(self, routed: Mapping[int, tuple[ShareMessage, bytes]]) -> OpenedShares:
        """Stage 2, first half: open and check the shares routed to this site; change nothing.

        A site calls this before it trains or spends anything for the round, so that a
        server which routes malformed or forged shares costs it no budget; :meth:`mask`
        then uses what this returns.

        Every neighbour that sent shares is a masking neighbour, whether its
        share was good or not. A share that fails to decrypt or to match its
        signed commitment, under a valid signature of its sender, is answered
        with a *complaint*: the private receive key for that sender, with which
        the server can check the ciphertext itself and blame whoever lied
        (the sender, or this site if the share was good). The key opens only
        that one ciphertext.

        Parameters
        ----------
        routed : Mapping[int, tuple[ShareMessage, bytes]]
            ``sender -> (its signed share message, the ciphertext for this site)``.

        Returns
        -------
        OpenedShares
            The opened shares (``None`` for a bad one) and ``sender -> receive
            private key`` complaints.

        Raises
        ------
        UnmaskRefusedError
            A ciphertext or share message was altered by the server (its
            signature or signed digest does not match).
        InvalidMessageError
            A sender is not a neighbour in this site's bundle.
        ProtocolAbort
            Fewer than ``t - 1`` neighbours sent shares.
        StageError
            If called out of order.
        """
        self._require(ClientStage.SHARED, "open its routed shares")
        received: dict[int, tuple[int, bytes, bytes] | None] = {}
        complaints: dict[int, bytes] = {}
        for raw_id, item in routed.items():
            sender = check_uint64(raw_id, "sender id")
            if sender not in self._bundle:
                raise InvalidMessageError(
                    f"node {self.node_id} received shares from node {sender}, which is not a "
                    "neighbour in its key bundle; the routing is inconsistent and this node "
                    "cannot continue the round"
                )
            try:
                message, ciphertext = item
            except (TypeError, ValueError):
                raise InvalidMessageError(
                    f"routed shares of node {sender} are not a (message, ciphertext) pair"
                ) from None
            try:
                received[sender] = self._open_share(sender, message, ciphertext)
            except UnmaskRefusedError:
                raise
            except SecAggError as exc:
                if not isinstance(message, ShareMessage) or not self._share_message_signed(sender, message):
                    raise UnmaskRefusedError(
                        f"node {sender}'s share message routed to node {self.node_id} is not "
                        f"signed by node {sender}: the server altered it; this site leaves the "
                        "round"
                    ) from None
                logger.warning(
                    "node %d: share from node %d is bad (%s); complaining", self.node_id, sender, exc
                )
                received[sender] = None
                complaints[sender] = self._recv_sk[sender]
        if len(received) + 1 < self.threshold:
            raise ProtocolAbort(
                f"masked-input stage: node {self.node_id} got shares from only {len(received)} "
                f"neighbours; with threshold {self.threshold} its self-mask could never be "
                "reconstructed, so it drops out of this round"
            )
        return OpenedShares(self._token, received, complaints)

    def mask(self, opened: OpenedShares, vector: np.ndarray) -> tuple[np.ndarray, dict[int, bytes]]:
        """Stage 2, second half: mask the (quantised) input with the opened shares' neighbours.

        Parameters
        ----------
        opened : OpenedShares
            What :meth:`open_shares` returned for this state.
        vector : numpy.ndarray
            1-D ``uint32`` input.

        Returns
        -------
        tuple[numpy.ndarray, dict[int, bytes]]
            The masked vector and ``sender -> receive private key`` complaints.

        Raises
        ------
        InvalidMessageError
            Another state object opened ``opened``, or ``vector`` is not a 1-D
            ``uint32`` array.
        StageError
            If called out of order.
        """
        self._require(ClientStage.SHARED, "compute its masked input")
        self._check_input(vector)
        if opened.opener != self._token:
            raise InvalidMessageError(f"node {self.node_id} was given shares that another round state opened")
        assert self._b is not None and self._s_sk is not None
        received = dict(opened.received)
        y = np.array(vector, dtype=MASK_DTYPE, copy=True)
        seeds = {
            peer: self._agree(self._s_sk, self._bundle[peer].s_pk, peer, PURPOSE_MASK)
            for peer in sorted(received)
        }
        # + PRG(b), + PRG(s_ij) for a higher neighbour j, - PRG(s_ij) for a lower one.
        apply_masks(
            y, [(self._b, 1)] + [(seed, 1 if peer > self.node_id else -1) for peer, seed in seeds.items()]
        )
        self._received, self._seeds = received, seeds
        self._b = self._s_sk = None
        self._recv_sk = {}
        self.stage = ClientStage.MASKED
        return y, dict(opened.complaints)

    def masked_input(
        self, routed: Mapping[int, tuple[ShareMessage, bytes]], vector: np.ndarray
    ) -> tuple[np.ndarray, dict[int, bytes]]:
        """Stage 2 in one call: :meth:`open_shares`, then :meth:`mask`.

        Raises
        ------
        UnmaskRefusedError, InvalidMessageError, ProtocolAbort, StageError
            As :meth:`open_shares` and :meth:`mask`.
        """
        self._check_input(vector)
        return self.mask(self.open_shares(routed), vector)

    def _check_input(self, vector: object) -> None:
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1:
            desc = (
                f"dtype {vector.dtype}, shape {vector.shape}"
                if isinstance(vector, np.ndarray)
                else type(vector).__name__
            )
            raise InvalidMessageError(
                f"input of node {self.node_id} must be a 1-D uint32 array, "
                f"got {desc}; quantize the update first"
            )

    def _decode_view(self, view_body: bytes) -> View:
        view, ctx_digest = View.decode(view_body)
        if ctx_digest != self.ctx.digest:
            raise _refuse(self.node_id, "the survivor view is for another round or cohort")
        return view

    def sign_view(self, view_body: bytes) -> bytes:
        """Stage 3 (consistency check): check the server's survivor view and sign it.

        Parameters
        ----------
        view_body : bytes
            :meth:`View.body` as sent by the server.

        Returns
        -------
        bytes
            This site's signature of the view (purpose ``b"view"``).

        Raises
        ------
        UnmaskRefusedError
            If the view lists this site as dropped, lists a site twice or outside
            the round, names a neighbour that never sent shares or omits one that
            did, leaves fewer than ``t`` of this site's share holders alive,
            names a key outside the roster or one key for two sites, or lists
            fewer survivors than this site's minimum.
        StageError
            If called out of order or twice.
        """
        self._require(ClientStage.MASKED, "sign a survivor view")
        me = self.node_id
        try:
            view = self._decode_view(view_body)
        except InvalidMessageError as exc:
            raise _refuse(me, f"the survivor view is malformed ({exc})") from None
        surv, drop = set(view.survivors), set(view.dropped)
        if me not in surv:
            raise _refuse(me, "it is listed as dropped although it sent its masked input")
        if surv & drop:
            raise _refuse(
                me,
                f"nodes {sorted(surv & drop)} are listed both as survivors and as "
                "dropped, which would reveal both secrets of those sites",
            )
        if (surv | drop) - self.participants:
            raise _refuse(
                me,
                f"nodes {sorted((surv | drop) - self.participants)[:5]} are not participants of this round",
            )
        fps = {**view.survivors, **view.dropped}
        known = {
            me: self.identity.fingerprint,
            **{n: hashlib.sha256(a.signer).digest() for n, a in self._bundle.items()},
        }
        for node, fp in fps.items():
            if node in known and fp != known[node]:
                raise _refuse(
                    me,
                    f"the view names another signing key for node {node} than the one that signed its keys",
                )
            if fp not in self.roster:
                raise _refuse(me, f"node {node}'s key {fingerprint_text(fp)} is not in this site's roster")
        if len(set(fps.values())) != len(fps):
            raise _refuse(me, "one signing key stands for two sites in the view (a Sybil)")
        listed = set(self.neighbours) & (surv | drop)
        masking = set(self._received)
        if listed != masking:
            missing, extra = sorted(masking - listed), sorted(listed - masking)
            why = (
                f"its neighbours {missing} are in neither list"
                if missing
                else f"neighbours {extra} are listed but never sent it shares"
            )
            raise _refuse(me, why)
        holders_alive = len(({me} | set(self._bundle)) & surv)
        if holders_alive < self.threshold:
            raise _refuse(
                me,
                f"only {holders_alive} of its own share holders survived, fewer than "
                f"the threshold {self.threshold}",
            )
        if len(surv) < self.min_survivors:
            raise _refuse(
                me,
                f"only {len(surv)} sites survived, below this site's minimum cohort of {self.min_survivors}",
            )
        signature = self.identity.sign(PURPOSE_VIEW, view.body(self.ctx.digest))
        self._view_digest = hashlib.sha256(bytes(view_body)).digest()
        self.stage = ClientStage.SIGNED
        return signature

    def unmask(self, view_body: bytes, signatures: Mapping[int, bytes]) -> UnmaskReply:
        """Stage 4: reveal the shares the server needs, once, for the view this site signed.

        For every site ``w`` whose secret it would help reveal (itself and its
        masking neighbours) the request must carry valid signatures on the same
        view from at least ``t`` distinct sites of ``w``'s neighbourhood
        ``{w} | N(w)`` (from roster keys, listed as survivors). Two different
        views can then never both reach that quorum (``2t > k + 1`` and each
        honest site signs one view), so everything ever revealed about ``w``
        comes from one view, which lists ``w`` either as survivor or as dropped.

        Revealed: self-mask shares of itself and its surviving masking
        neighbours; for dropped masking neighbours, the mask-key share and the
        pairwise mask seed (which only undoes this site's own mask with that
        neighbour). Never both kinds for one site, never its own mask key.

        Parameters
        ----------
        view_body : bytes
            The view, byte for byte the one this site signed.
        signatures : Mapping[int, bytes]
            ``signer -> signature`` of the view, relayed by the server.

        Returns
        -------
        dict
            ``{"b_shares": {owner: (index, share)}, "sk_shares": {owner: (index,
            share)}, "seeds": {owner: seed}}``.

        Raises
        ------
        UnmaskRefusedError
            The view is not the one it signed, or a quorum is missing.
        StageError
            If called out of order or a second time.
        """
        self._require(ClientStage.SIGNED, "answer an unmask request")
        me = self.node_id
        if hashlib.sha256(bytes(view_body)).digest() != self._view_digest:
            raise _refuse(me, "the unmask request carries a different view than the one it signed")
        view = self._decode_view(view_body)
        body = view.body(self.ctx.digest)
        valid = {me}
        for raw_id, sig in signatures.items():
            signer = check_uint64(raw_id, "signer id")
            if (
                signer in view.survivors
                and signer not in valid
                and self.roster.verify(view.survivors[signer], PURPOSE_VIEW, body, sig)
            ):
                valid.add(signer)
        for owner in sorted({me} | set(self._received)):
            quorum = len(valid & self.ctx.neighbourhood(owner))
            if quorum < self.threshold:
                raise _refuse(
                    me,
                    f"only {quorum} valid signatures on its view come from node "
                    f"{owner}'s neighbourhood, fewer than the threshold "
                    f"{self.threshold}: another view may exist for that site",
                )
        assert self._own_share is not None
        b_out: dict[int, tuple[int, bytes]] = {me: (self._own_share[0], self._own_share[1])}
        sk_out: dict[int, tuple[int, bytes]] = {}
        seeds: dict[int, bytes] = {}
        for owner, share in sorted(self._received.items()):
            if owner in view.survivors:
                if share is not None:
                    b_out[owner] = (share[0], share[1])
            else:
                seeds[owner] = self._seeds[owner]
                if share is not None:
                    sk_out[owner] = (share[0], share[2])
        self._own_share = None
        self._received, self._seeds, self._bundle = {}, {}, {}
        self._view_digest = b""
        self.stage = ClientStage.DONE
        return {B_SHARES: b_out, SK_SHARES: sk_out, SEEDS: seeds}

    # ------------------------------------------------------------ persistence
    def export_state(self) -> dict[str, bytes | int | str]:
        """Serialise the state for the node's own storage (e.g. Flower's ``Context.state``).

        Returns ``{"format": STATE_FORMAT, "version": STATE_VERSION, "state":
        bytes, "digest": bytes}``: ``state`` is canonical JSON (sorted keys,
        bytes as hex) of the stage, the round context, the key material and
        shares the stage needs; ``digest`` is :func:`state_digest` of it. The
        signing identity and roster are not included: pass them again to
        :meth:`restore_state`. The record holds this node's secrets: store it
        only where they may live; it must never be sent.
        """

        def hx(b: bytes | None) -> str:
            return b.hex() if b else ""

        ctx = self.ctx
        data = {
            "stage": self.stage.value,
            "node": str(self.node_id),
            "run": str(ctx.run_id),
            "round": str(ctx.round_id),
            "k": ctx.k,
            "t": ctx.threshold,
            "participants": [str(i) for i in ctx.participants],
            "challenge": ctx.challenge.hex(),
            "min_survivors": self.min_survivors,
            "identity": self.identity.fingerprint.hex(),
            "c_send_sk": hx(self._c_send_sk),
            "s_sk": hx(self._s_sk),
            "recv_sk": {str(n): k.hex() for n, k in sorted(self._recv_sk.items())},
            "b": hx(self._b),
            "own_share": (
                [self._own_share[0], self._own_share[1].hex(), self._own_share[2].hex()]
                if self._own_share
                else None
            ),
            "bundle": {str(n): a.encode(ctx.digest).hex() for n, a in sorted(self._bundle.items())},
            "received": {
                str(n): ([s[0], s[1].hex(), s[2].hex()] if s else None)
                for n, s in sorted(self._received.items())
            },
            "seeds": {str(n): s.hex() for n, s in sorted(self._seeds.items())},
            "view": self._view_digest.hex(),
        }
        state = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("ascii")
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "state": state,
            "digest": state_digest(state),
        }

    @classmethod
    def restore_state(cls, data: Mapping[str, object], *, identity: Identity, roster: Roster) -> ClientState:
        """Rebuild a :class:`ClientState` from :meth:`export_state`'s output.

        The record is fully validated (format, version, digest, JSON schema,
        the round's parameters, key lengths and pairs, and which entries the
        recorded stage must or must not hold) before an object is built.

        Raises
        ------
        StateFormatError
            If anything is missing, extra, of the wrong type or length, or
            inconsistent.
        """

        def fail(why: str) -> StateFormatError:
            return StateFormatError(
                f"cannot restore the secure-aggregation client state: {why}; "
                "the record is corrupted or from another version, so this "
                "node cannot continue the round"
            )

        if not isinstance(data, Mapping) or set(data) != {"format", "version", "state", "digest"}:
            raise fail("expected exactly the entries format, version, state, digest")
        if data["format"] != STATE_FORMAT or data["version"] != STATE_VERSION:
            raise fail(
                f"format/version is {data['format']!r}/{data['version']!r}, this code "
                f"reads {STATE_FORMAT!r}/{STATE_VERSION}"
            )
        state, digest = data["state"], data["digest"]
        if not isinstance(state, (bytes, bytearray)) or not isinstance(digest, (bytes, bytearray)):
            raise fail("state and digest must be bytes")
        if state_digest(bytes(state)) != bytes(digest):
            raise fail("the digest does not match the content")
        try:
            return cls._from_json(json.loads(bytes(state)), identity, roster)
        except (ValueError, TypeError, KeyError, AttributeError, SecAggError) as exc:
            raise fail(str(exc) or type(exc).__name__) from None

    @classmethod
    def _from_json(cls, d: dict[str, Any], identity: Identity, roster: Roster) -> ClientState:
        keys = {
            "stage",
            "node",
            "run",
            "round",
            "k",
            "t",
            "participants",
            "challenge",
            "min_survivors",
            "identity",
            "c_send_sk",
            "s_sk",
            "recv_sk",
            "b",
            "own_share",
            "bundle",
            "received",
            "seeds",
            "view",
        }
        if set(d) != keys:
            raise ValueError(f"entries {sorted(set(d) ^ keys)} are missing or unexpected")

        def raw(text: str, sizes: tuple[int, ...] = (0, KEY_BYTES)) -> bytes:
            value = bytes.fromhex(text)
            if len(value) not in sizes:
                raise ValueError(f"a {len(value)}-byte field where {sizes} bytes are allowed")
            return value

        def node(text: str) -> int:
            if not isinstance(text, str) or not text.isdigit():
                raise ValueError(f"node id {text!r} is not a decimal string")
            return check_uint64(int(text), "node id")

        def share(item: list) -> tuple[int, bytes, bytes]:
            idx, b_sh, sk_sh = item
            if not isinstance(idx, int) or not 1 <= idx <= 0xFFFF:
                raise ValueError(f"Shamir index {idx!r} is out of range")
            return idx, raw(b_sh, (SECRET_BYTES,)), raw(sk_sh, (SECRET_BYTES,))

        ctx = RoundContext(
            node(d["run"]),
            node(d["round"]),
            tuple(node(i) for i in d["participants"]),
            d["k"],
            d["t"],
            raw(d["challenge"], (KEY_BYTES,)),
        )
        if ctx.k != d["k"]:
            raise ValueError(f"k={d['k']} is not the effective neighbour count {ctx.k}")
        if raw(d["identity"], (32,)) != identity.fingerprint:
            raise ValueError("the state was made with another signing key than this site's")
        state = cls(node(d["node"]), ctx, identity=identity, roster=roster, min_survivors=d["min_survivors"])
        stage = ClientStage(d["stage"])
        state._c_send_sk = raw(d["c_send_sk"]) or None
        state._s_sk = raw(d["s_sk"]) or None
        state._recv_sk = {node(n): raw(k, (KEY_BYTES,)) for n, k in d["recv_sk"].items()}
        state._b = raw(d["b"]) or None
        state._own_share = share(d["own_share"]) if d["own_share"] is not None else None
        for n, enc in d["bundle"].items():
            advert, ctx_digest = Advert.decode(bytes.fromhex(enc))
            if ctx_digest != ctx.digest or advert.node != node(n) or node(n) not in state.neighbours:
                raise ValueError(f"the recorded key bundle entry for node {n} is inconsistent")
            state._bundle[node(n)] = advert
        state._received = {node(n): (share(s) if s is not None else None) for n, s in d["received"].items()}
        state._seeds = {node(n): raw(s, (KEY_BYTES,)) for n, s in d["seeds"].items()}
        state._view_digest = raw(d["view"], (0, 32))
        present = {
            "c_send_sk": state._c_send_sk is not None,
            "s_sk": state._s_sk is not None,
            "recv_sk": bool(state._recv_sk),
            "b": state._b is not None,
            "own_share": state._own_share is not None,
            "bundle": bool(state._bundle),
            "received": bool(state._received),
            "seeds": bool(state._seeds),
            "view": bool(state._view_digest),
        }
        allowed = {
            ClientStage.INIT: set(),
            ClientStage.ADVERTISED: {"c_send_sk", "s_sk", "recv_sk"},
            ClientStage.SHARED: {"s_sk", "recv_sk", "b", "own_share", "bundle"},
            ClientStage.MASKED: {"own_share", "bundle", "received", "seeds"},
            ClientStage.SIGNED: {"own_share", "bundle", "received", "seeds", "view"},
            ClientStage.DONE: set(),
        }[stage]
        must = {
            ClientStage.ADVERTISED: {"c_send_sk", "s_sk"},
            ClientStage.SHARED: {"s_sk", "b", "own_share"},
            ClientStage.MASKED: {"own_share"},
            ClientStage.SIGNED: {"own_share", "view"},
        }.get(stage, set())
        held = {name for name, is_set in present.items() if is_set}
        if held - allowed or must - held:
            raise ValueError(
                f"stage '{stage.value}' holds {sorted(held)}; it may hold "
                f"{sorted(allowed)} and must hold {sorted(must)}"
            )
        if state._recv_sk and set(state._recv_sk) != set(state.neighbours):
            raise ValueError("the recorded receive keys are not one per neighbour")
        if set(state._received) - set(state._bundle) or set(state._seeds) != set(state._received):
            raise ValueError("the recorded shares or seeds name sites outside the key bundle")
        if state._own_share and state._own_share[0] != ctx.index_of(state.node_id, state.node_id):
            raise ValueError("the recorded own share has the wrong Shamir index")
        for sender, item in state._received.items():
            if item is not None and item[0] != ctx.index_of(sender, state.node_id):
                raise ValueError(f"the recorded share from node {sender} has the wrong index")
        for secret in (state._c_send_sk, state._s_sk, *state._recv_sk.values()):
            if secret is not None:
                public_key_from_private(secret)
        state.stage = stage
        return state
