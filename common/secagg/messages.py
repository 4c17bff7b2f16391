"""Canonical byte encodings of the SecAgg+ messages that are signed or committed to.

Every integer is big-endian and fixed width; every variable-length field carries
its length; a decoder consumes its input exactly and raises
:class:`~fedseal.common.secagg.errors.InvalidMessageError` otherwise. The same bytes are
signed and sent, so there is one encoding per message, pinned by known-answer
tests.

* :class:`RoundContext` - what every signature is bound to: run, round, the
  participant list, ``k``, ``t`` and the server's per-round challenge key;
* :class:`Advert` - a site's public keys for the round (signed, ``b"advert"``);
* :class:`ShareMessage` - per share holder: Shamir index, commitments to the two
  shares and a digest of the ciphertext carrying them (signed, ``b"shares"``);
* :class:`View` - the survivor and dropped lists of the consistency round, with
  each listed site's key fingerprint (signed, ``b"view"``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from .crypto import KEY_BYTES, check_uint64
from .errors import ConfigError, InvalidMessageError
from .graph import RingGraph, validate_parameters
from .identity import FINGERPRINT_BYTES, MAX_BLOB_BYTES, MAX_SIGNATURE_BYTES

__all__ = [
    "ROUND_LABEL",
    "COMMIT_LABEL",
    "CIPHERTEXT_LABEL",
    "PURPOSE_ADVERT",
    "PURPOSE_SHARES",
    "PURPOSE_VIEW",
    "DIGEST_BYTES",
    "RoundContext",
    "Advert",
    "ShareEntry",
    "ShareMessage",
    "View",
    "share_commitment",
    "seed_commitment",
    "ciphertext_digest",
    "pack_var_table",
    "unpack_var_table",
]

ROUND_LABEL = b"fedseal-secagg-v2 round\x00"
"""Domain label of :attr:`RoundContext.digest`."""
COMMIT_LABEL = b"fedseal-secagg-v2 share-commit\x00"
"""Domain label of :func:`share_commitment`."""
CIPHERTEXT_LABEL = b"fedseal-secagg-v2 ciphertext\x00"
"""Domain label of :func:`ciphertext_digest`."""
PURPOSE_ADVERT = b"advert"
PURPOSE_SHARES = b"shares"
PURPOSE_VIEW = b"view"
DIGEST_BYTES = 32
NO_CIPHERTEXT = bytes(DIGEST_BYTES)
"""Ciphertext digest of a holder that gets no ciphertext (the owner itself, or a
neighbour that did not advertise keys)."""
MAX_TABLE_ENTRIES = 1 << 20


class _Writer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u16(self, v: int) -> _Writer:
        self._parts.append(struct.pack(">H", v))
        return self

    def u32(self, v: int) -> _Writer:
        self._parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> _Writer:
        self._parts.append(struct.pack(">Q", v))
        return self

    def raw(self, b: bytes) -> _Writer:
        self._parts.append(bytes(b))
        return self

    def var16(self, b: bytes) -> _Writer:
        return self.u16(len(b)).raw(b)

    def var32(self, b: bytes) -> _Writer:
        return self.u32(len(b)).raw(b)

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class _Reader:
    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidMessageError(f"{what} must be bytes, got {type(data).__name__}")
        self.data = bytes(data)
        self.off = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.off + n > len(self.data):
            raise InvalidMessageError(f"{self.what} is truncated ({len(self.data)} bytes)")
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def var16(self, limit: int) -> bytes:
        n = self.u16()
        if n > limit:
            raise InvalidMessageError(f"{self.what} has a {n}-byte field, more than {limit}")
        return self.take(n)

    def var32(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise InvalidMessageError(f"{self.what} has a {n}-byte field, more than {limit}")
        return self.take(n)

    def count(self, limit: int) -> int:
        n = self.u32()
        if n > limit:
            raise InvalidMessageError(f"{self.what} lists {n} entries, more than {limit}")
        return n

    def done(self) -> None:
        if self.off != len(self.data):
            raise InvalidMessageError(
                f"{self.what} has {len(self.data) - self.off} unexpected trailing bytes"
            )


def _ids(ids: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(sorted(check_uint64(i, what) for i in ids))
    if len(set(out)) != len(out):
        raise InvalidMessageError(f"{what} list contains duplicates")
    return out


@dataclass(frozen=True)
class RoundContext:
    """The public parameters of one SecAgg+ round, which every signature binds.

    Parameters
    ----------
    run_id, round_id : int
        Flower run id and server round (unsigned 64-bit).
    participants : Sequence[int]
        The node ids selected for the round (any order; stored sorted).
    k : int
        Requested neighbour count; stored as the effective ``min(k, n - 1)``.
    threshold : int
        Shamir threshold ``t`` (``2t > k + 1``).
    challenge : bytes
        The server's per-round X25519 public key, against which sites prove they
        hold their mask keys (32 bytes).

    Raises
    ------
    ConfigError
        If the parameters break the SecAgg+ rules.
    InvalidMessageError
        If an id is out of range or duplicated, or the challenge is not 32 bytes.
    """

    run_id: int
    round_id: int
    participants: tuple[int, ...]
    k: int
    threshold: int
    challenge: bytes
    graph: RingGraph = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = _ids(self.participants, "participant")
        if not ids:
            raise ConfigError("a round needs at least one participant")
        object.__setattr__(self, "participants", ids)
        object.__setattr__(self, "run_id", check_uint64(self.run_id, "run_id"))
        object.__setattr__(self, "round_id", check_uint64(self.round_id, "round_id"))
        k_eff = validate_parameters(len(ids), self.k, self.threshold)
        object.__setattr__(self, "k", k_eff)
        object.__setattr__(self, "threshold", int(self.threshold))
        if not isinstance(self.challenge, (bytes, bytearray)) or len(self.challenge) != KEY_BYTES:
            raise InvalidMessageError(f"the round's challenge key must be {KEY_BYTES} bytes")
        object.__setattr__(self, "challenge", bytes(self.challenge))
        object.__setattr__(self, "graph", RingGraph(ids, k_eff))  # lists made when asked

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of ``ROUND_LABEL || run || round || k (u16) || t (u16) || challenge
        || n (u32) || ids (u64 each)``."""
        w = _Writer().raw(ROUND_LABEL).u64(self.run_id).u64(self.round_id).u16(self.k)
        w.u16(self.threshold).raw(self.challenge).u32(len(self.participants))
        for i in self.participants:
            w.u64(i)
        return hashlib.sha256(w.bytes()).digest()

    def holders(self, owner: int) -> tuple[int, ...]:
        """The ``k + 1`` holders of ``owner``'s shares (itself and its neighbours), sorted.

        Holder ``p`` (0-based position) gets Shamir index ``p + 1``.
        """
        return tuple(sorted([owner, *self.graph[owner]]))

    def index_of(self, owner: int, holder: int) -> int:
        """Shamir index of ``holder``'s share of ``owner``'s secrets."""
        return self.holders(owner).index(holder) + 1

    def neighbourhood(self, node: int) -> frozenset[int]:
        """``{node} | N(node)``: the sites whose signatures vouch for ``node``'s status."""
        return frozenset([node, *self.graph[node]])


def share_commitment(ctx: RoundContext, owner: int, index: int, kind: bytes, share: bytes) -> bytes:
    """Commitment to one Shamir share: ``SHA-256(COMMIT_LABEL || ctx.digest || owner
    || index (u16) || kind || share)`` with ``kind`` ``b"b"`` (self-mask seed) or
    ``b"s"`` (mask key)."""
    if kind not in (b"b", b"s"):
        raise ConfigError("share kind must be b'b' or b's'")
    data = _Writer().raw(COMMIT_LABEL).raw(ctx.digest).u64(owner).u16(index).raw(kind)
    return hashlib.sha256(data.raw(share).bytes()).digest()


def seed_commitment(ctx: RoundContext, owner: int, seed: bytes) -> bytes:
    """Commitment to a self-mask seed: ``SHA-256(COMMIT_LABEL || ctx.digest || owner ||
    b"seed" || seed)``; checked against the seed rebuilt from the shares."""
    data = _Writer().raw(COMMIT_LABEL).raw(ctx.digest).u64(owner).raw(b"seed").raw(seed)
    return hashlib.sha256(data.bytes()).digest()


def ciphertext_digest(ciphertext: bytes) -> bytes:
    """``SHA-256(CIPHERTEXT_LABEL || ciphertext)``."""
    return hashlib.sha256(CIPHERTEXT_LABEL + bytes(ciphertext)).digest()


def _key(r: _Reader) -> bytes:
    return r.take(KEY_BYTES)


@dataclass(frozen=True)
class Advert:
    """A site's public keys for one round, signed with its long-term key.

    Attributes
    ----------
    node : int
        The advertising node id.
    signer : bytes
        OpenSSH blob of the site's public signing key.
    c_send : bytes
        X25519 key the site encrypts its outgoing shares with.
    s_pk : bytes
        X25519 mask-agreement key.
    recv : tuple[tuple[int, bytes], ...]
        ``(neighbour, X25519 key)``, sorted: the key the site receives that
        neighbour's shares under (one per neighbour, so that revealing one to
        prove a complaint exposes nothing else).
    pop : bytes
        Proof that the site holds the private half of ``s_pk`` (see
        :func:`~fedseal.common.secagg.crypto.proof_of_possession`); not signed.
    signature : bytes
        Signature of :meth:`body` with purpose ``b"advert"``.
    """

    node: int
    signer: bytes
    c_send: bytes
    s_pk: bytes
    recv: tuple[tuple[int, bytes], ...]
    pop: bytes
    signature: bytes = b""

    def body(self, ctx_digest: bytes) -> bytes:
        """``ctx || node || SHA-256(signer) || c_send || s_pk || m (u16) || (nbr, key)*``."""
        w = _Writer().raw(ctx_digest).u64(self.node).raw(hashlib.sha256(self.signer).digest())
        w.raw(self.c_send).raw(self.s_pk).u16(len(self.recv))
        for nbr, key in self.recv:
            w.u64(nbr).raw(key)
        return w.bytes()

    def encode(self, ctx_digest: bytes) -> bytes:
        """``var32(body) || pop || var16(signer) || var16(signature)``."""
        return (
            _Writer()
            .var32(self.body(ctx_digest))
            .raw(self.pop)
            .var16(self.signer)
            .var16(self.signature)
            .bytes()
        )

    @classmethod
    def decode(cls, data: object) -> tuple[Advert, bytes]:
        """Parse :meth:`encode`'s output; returns the advert and the context digest it names."""
        r = _Reader(data, "advertisement")
        body = _Reader(r.var32(1 << 20), "advertisement body")
        ctx_digest = body.take(DIGEST_BYTES)
        node = body.u64()
        signer_digest = body.take(DIGEST_BYTES)
        c_send, s_pk = _key(body), _key(body)
        recv = tuple((body.u64(), _key(body)) for _ in range(body.u16()))
        body.done()
        pop = r.take(DIGEST_BYTES)
        signer = r.var16(MAX_BLOB_BYTES)
        signature = r.var16(MAX_SIGNATURE_BYTES)
        r.done()
        if hashlib.sha256(signer).digest() != signer_digest:
            raise InvalidMessageError("advertisement names a signing key other than the one it carries")
        if [n for n, _ in recv] != sorted({n for n, _ in recv}):
            raise InvalidMessageError("advertisement's receive keys are not sorted by distinct node id")
        return cls(node, signer, c_send, s_pk, recv, pop, signature), ctx_digest

    def recv_key(self, neighbour: int) -> bytes | None:
        """The key this site receives ``neighbour``'s shares under, if it advertised one."""
        for nbr, key in self.recv:
            if nbr == neighbour:
                return key
        return None


@dataclass(frozen=True)
class ShareEntry:
    """One holder's line of a :class:`ShareMessage`."""

    holder: int
    index: int
    commit_b: bytes
    commit_sk: bytes
    ciphertext: bytes  # digest of the ciphertext sent to the holder, or NO_CIPHERTEXT


@dataclass(frozen=True)
class ShareMessage:
    """What a site commits to when it deals its shares: its seed, and one entry per holder."""

    owner: int
    seed: bytes  # seed_commitment of the self-mask seed
    entries: tuple[ShareEntry, ...]
    signature: bytes = b""

    def body(self, ctx_digest: bytes) -> bytes:
        """``ctx || owner || seed commitment || m (u16) || (holder, index (u16), Cb, Csk,
        ct digest)*``."""
        w = _Writer().raw(ctx_digest).u64(self.owner).raw(self.seed).u16(len(self.entries))
        for e in self.entries:
            w.u64(e.holder).u16(e.index).raw(e.commit_b).raw(e.commit_sk).raw(e.ciphertext)
        return w.bytes()

    def encode(self, ctx_digest: bytes) -> bytes:
        """``var32(body) || var16(signature)``."""
        return _Writer().var32(self.body(ctx_digest)).var16(self.signature).bytes()

    @classmethod
    def decode(cls, data: object) -> tuple[ShareMessage, bytes]:
        """Parse :meth:`encode`'s output; returns the message and its context digest."""
        r = _Reader(data, "share message")
        body = _Reader(r.var32(1 << 24), "share message body")
        ctx_digest = body.take(DIGEST_BYTES)
        owner = body.u64()
        seed = body.take(DIGEST_BYTES)
        entries = tuple(
            ShareEntry(
                body.u64(),
                body.u16(),
                body.take(DIGEST_BYTES),
                body.take(DIGEST_BYTES),
                body.take(DIGEST_BYTES),
            )
            for _ in range(body.u16())
        )
        body.done()
        signature = r.var16(MAX_SIGNATURE_BYTES)
        r.done()
        return cls(owner, seed, entries, signature), ctx_digest

    def entry(self, holder: int) -> ShareEntry | None:
        """The entry of ``holder``, if any."""
        for e in self.entries:
            if e.holder == holder:
                return e
        return None


@dataclass(frozen=True)
class View:
    """The server's claim of who survived the masked-input stage.

    ``survivors`` and ``dropped`` map node id to the fingerprint of its signing
    key, so that every site signing the view agrees on one key per node.
    """

    survivors: Mapping[int, bytes]
    dropped: Mapping[int, bytes]

    def body(self, ctx_digest: bytes) -> bytes:
        """``ctx || ns (u32) || (id, fp)* || nd (u32) || (id, fp)*``, ids ascending."""
        w = _Writer().raw(ctx_digest)
        for table in (self.survivors, self.dropped):
            w.u32(len(table))
            for node in sorted(table):
                w.u64(node).raw(table[node])
        return w.bytes()

    @classmethod
    def decode(cls, data: object) -> tuple[View, bytes]:
        """Parse :meth:`body`'s output; returns the view and its context digest."""
        r = _Reader(data, "survivor view")
        ctx_digest = r.take(DIGEST_BYTES)
        tables = []
        for what in ("survivor", "dropped"):
            entries = [(r.u64(), r.take(FINGERPRINT_BYTES)) for _ in range(r.count(MAX_TABLE_ENTRIES))]
            ids = [i for i, _ in entries]
            if ids != sorted(set(ids)):
                raise InvalidMessageError(f"the {what} list is not sorted by distinct node id")
            tables.append(dict(entries))
        r.done()
        return cls(tables[0], tables[1]), ctx_digest


def pack_var_table(table: Mapping[int, bytes]) -> bytes:
    """``{node: payload}`` (payloads of any length) as ``n (u32) || (id, var32)*``, ids ascending."""
    w = _Writer().u32(len(table))
    for node in sorted(table):
        w.u64(node).var32(table[node])
    return w.bytes()


def unpack_var_table(data: object, what: str = "table") -> dict[int, bytes]:
    """Inverse of :func:`pack_var_table`; ids must be ascending and distinct."""
    r = _Reader(data, what)
    out: dict[int, bytes] = {}
    last = -1
    for _ in range(r.count(MAX_TABLE_ENTRIES)):
        node = r.u64()
        if node <= last:
            raise InvalidMessageError(f"{what} ids are not ascending and distinct")
        last = node
        out[node] = r.var32(1 << 28)
    r.done()
    return out
