"""One bad reply drops one site: every stage checks each reply on its own.

A malicious (or broken) site sends something wrong at one stage; the server
names that site with the reason, never raises, and recovers the exact sum of
the others. Shares that do not open are blamed on whoever lied: the sender of a
bad share, or a site that complains about a good one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_round, staged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseal.common.secagg import Advert, ProtocolAbort, ShareMessage, agree, generate_key_pair
from fedseal.common.secagg.crypto import encrypt_share, proof_of_possession
from fedseal.common.secagg.messages import PURPOSE_ADVERT, PURPOSE_SHARES, ShareEntry, ciphertext_digest
from fedseal.common.secagg.protocol import B_SHARES, PURPOSE_SHARE, SEEDS, SK_SHARES, encode_share_payload


def _finish(r, masked=None, skip=()):
    """Stages 2-4 honestly for everyone not in ``skip``; return (sum, all rejections)."""
    rejected = dict(
        r.mask(masked if masked is not None else r.masked_replies([i for i in r.routed if i not in skip]))
    )
    rejected.update(r.sign([i for i in r.server.survivors if i not in skip]))
    total, bad = r.finalize({i: rep for i, rep in r.unmask_replies().items() if i not in skip})
    rejected.update(bad)
    return total, rejected


def _resign_advert(r, adverts, node: int, **changes) -> bytes:
    """``node``'s advert with fields changed and signed again by ``node`` (a malicious site)."""
    advert, _ = Advert.decode(adverts[node])
    fields = {**advert.__dict__, **changes, "signature": b""}
    unsigned = Advert(**fields)
    signature = r.identities[node].sign(PURPOSE_ADVERT, unsigned.body(r.ctx.digest))
    return Advert(**{**fields, "signature": signature}).encode(r.ctx.digest)


# ------------------------------------------------------------------ stage 0
@pytest.mark.parametrize(
    "case",
    [
        "31-byte key",
        "all-zero key",
        "low-order key",
        "copied key",
        "copied advert",
        "bad signature",
        "not bytes",
    ],
)
def test_a_bad_advert_drops_its_sender_only(case: str) -> None:
    r = make_round(8, k=7, threshold=5, seed=1)
    bad, victim = r.ids[2], r.ids[3]
    adverts = r.adverts()
    if case == "31-byte key":
        adverts[bad] = adverts[bad][: 4 + 32 + 8 + 32 + 31] + adverts[bad][4 + 32 + 8 + 32 + 32 :]
    elif case == "all-zero key":
        adverts[bad] = _resign_advert(r, adverts, bad, s_pk=bytes(32))
    elif case == "low-order key":  # a point of order 8 on Curve25519
        low = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
        adverts[bad] = _resign_advert(r, adverts, bad, c_send=low)
    elif case == "copied key":  # another site's mask key, signed by the copier
        victim_advert, _ = Advert.decode(adverts[victim])
        adverts[bad] = _resign_advert(r, adverts, bad, s_pk=victim_advert.s_pk)
    elif case == "copied advert":
        adverts[bad] = adverts[victim]
    elif case == "bad signature":
        adverts[bad] = adverts[bad][:-1] + bytes([adverts[bad][-1] ^ 1])
    else:
        adverts[bad] = 12345
    rejected = r.advertise(adverts)
    assert set(rejected) == {bad} and "bad keys" in rejected[bad]
    assert r.share() == {}
    total, rejected = _finish(r, skip={bad})
    assert rejected == {}
    assert np.array_equal(total, r.expected([i for i in r.ids if i != bad]))


def test_a_copied_mask_key_cannot_be_proved_by_the_copier() -> None:
    """The proof of possession is what tells the copier from the honest owner."""
    r = make_round(5, k=4, threshold=3, seed=2)
    owner_sk, owner_pk = generate_key_pair()
    d = r.ctx.digest
    assert proof_of_possession(owner_sk, r.ctx.challenge, ctx_digest=d, node=1) != proof_of_possession(
        generate_key_pair()[0], r.ctx.challenge, ctx_digest=d, node=1
    )
    adverts = r.adverts()
    a, b = r.ids[0], r.ids[1]
    advert_a, _ = Advert.decode(adverts[a])
    adverts[b] = _resign_advert(r, adverts, b, s_pk=advert_a.s_pk)
    rejected = r.advertise(adverts)
    assert set(rejected) == {b} and "prove it holds" in rejected[b]


# ------------------------------------------------------------------ stage 1
def _bad_shares(r, sender: int, case: str):
    replies = r.share_replies()
    message, cts = replies[sender]
    receiver = sorted(cts)[0]
    if case == "short ciphertext":
        cts = {**cts, receiver: cts[receiver][:-1]}
    elif case == "missing receiver":
        cts = {k: v for k, v in cts.items() if k != receiver}
    elif case == "extra receiver":
        cts = {**cts, 424242: cts[receiver]}
    elif case == "swapped ciphertext":
        other = sorted(cts)[1]
        cts = {**cts, receiver: cts[other], other: cts[receiver]}
    elif case == "bad signature":
        message = message[:-1] + bytes([message[-1] ^ 1])
    elif case == "truncated message":
        message = message[:40]
    elif case == "not a pair":
        return {**replies, sender: b"nonsense"}
    return {**replies, sender: (message, cts)}


@pytest.mark.parametrize(
    "case",
    [
        "short ciphertext",
        "missing receiver",
        "extra receiver",
        "swapped ciphertext",
        "bad signature",
        "truncated message",
        "not a pair",
    ],
)
def test_bad_shares_drop_their_sender_only(case: str) -> None:
    r = make_round(8, k=7, threshold=5, seed=3)
    r.advertise()
    bad = r.ids[4]
    rejected = r.share(_bad_shares(r, bad, case))
    assert set(rejected) == {bad} and "bad shares" in rejected[bad]
    total, rejected = _finish(r)
    assert rejected == {}
    assert np.array_equal(total, r.expected([i for i in r.ids if i != bad]))


def _dishonest_dealer(r, sender: int, victim: int, *, garbage_ciphertext: bool):
    """``sender`` signs, for ``victim``, a ciphertext that does not open, or one that opens
    to shares off its commitments: a malicious dealer trying to knock out a neighbour."""
    c_send_sk = bytes.fromhex(json.loads(r.clients[sender].export_state()["state"])["c_send_sk"])
    replies = r.share_replies()
    message, cts = replies[sender]
    msg, _ = ShareMessage.decode(message)
    if garbage_ciphertext:
        ct = bytes(len(cts[victim]))
    else:
        key = agree(
            c_send_sk,
            r.bundles[sender][victim].recv_key(sender),
            run_id=r.ctx.run_id,
            round_id=r.ctx.round_id,
            node_a=sender,
            node_b=victim,
            purpose=PURPOSE_SHARE,
        )
        idx = r.ctx.index_of(sender, victim)
        ct = encrypt_share(
            key,
            encode_share_payload(sender, victim, idx, bytes(32), bytes(32)),
            sender=sender,
            receiver=victim,
            run_id=r.ctx.run_id,
            round_id=r.ctx.round_id,
        )
    entries = tuple(
        e
        if e.holder != victim
        else ShareEntry(e.holder, e.index, e.commit_b, e.commit_sk, ciphertext_digest(ct))
        for e in msg.entries
    )
    unsigned = ShareMessage(sender, msg.seed, entries)
    signed = ShareMessage(
        sender, msg.seed, entries, r.identities[sender].sign(PURPOSE_SHARES, unsigned.body(r.ctx.digest))
    )
    return {**replies, sender: (signed.encode(r.ctx.digest), {**cts, victim: ct})}


@pytest.mark.parametrize("garbage", [True, False])
def test_shares_that_do_not_open_are_blamed_on_their_sender(garbage: bool) -> None:
    r = make_round(8, k=7, threshold=5, seed=4)
    r.advertise()
    sender, victim = r.ids[1], r.ids[6]
    assert r.share(_dishonest_dealer(r, sender, victim, garbage_ciphertext=garbage)) == {}
    masked = r.masked_replies()
    assert set(masked[victim][1]) == {sender}  # the victim keeps going and complains
    total, rejected = _finish(r, masked)
    assert set(rejected) == {sender} and "does not open" in rejected[sender]
    assert np.array_equal(total, r.expected([i for i in r.ids if i != sender]))


def test_a_false_complaint_is_blamed_on_the_complainer() -> None:
    r = staged(8, k=7, threshold=5, seed=5)
    liar, accused = r.ids[2], r.ids[5]
    recv_sk = json.loads(r.clients[liar].export_state()["state"])["recv_sk"][str(accused)]
    masked = r.masked_replies()
    masked[liar] = (masked[liar][0], {accused: bytes.fromhex(recv_sk)})
    total, rejected = _finish(r, masked)
    assert set(rejected) == {liar} and "false complaint" in rejected[liar]
    assert np.array_equal(total, r.expected([i for i in r.ids if i != liar]))


# ------------------------------------------------------------------ stage 2
@pytest.mark.parametrize(
    "case",
    [
        "short vector",
        "long vector",
        "int32",
        "2-D",
        "list",
        "complaint about a stranger",
        "complaint with a wrong key",
        "not a pair",
    ],
)
def test_a_bad_masked_input_drops_its_sender_only(case: str) -> None:
    r = staged(8, k=7, threshold=5, seed=6)
    masked = r.masked_replies()
    bad = r.ids[3]
    y, complaints = masked[bad]
    other = next(iter(r.routed[bad]))
    value: object = {
        "short vector": (y[:-1], complaints),
        "long vector": (np.append(y, 1), complaints),
        "int32": (y.view(np.int32), complaints),
        "2-D": (y.reshape(4, -1), complaints),
        "list": (list(y), complaints),
        "complaint about a stranger": (y, {12345: bytes(32)}),
        "complaint with a wrong key": (y, {other: bytes(32)}),
        "not a pair": y,
    }[case]
    masked[bad] = value
    total, rejected = _finish(r, masked)
    assert set(rejected) == {bad} and "bad masked input" in rejected[bad]
    assert np.array_equal(total, r.expected([i for i in r.ids if i != bad]))


# ------------------------------------------------------------------ stage 3
def test_a_bad_view_signature_keeps_the_input_but_not_the_signer() -> None:
    r = staged(8, k=7, threshold=5, seed=7)
    r.mask()
    sigs = {i: r.clients[i].sign_view(r.view) for i in r.server.survivors}
    bad = r.ids[0]
    sigs[bad] = sigs[bad][:-1] + bytes([sigs[bad][-1] ^ 1])
    r.relays, rejected = r.server.collect_signatures(sigs)
    assert set(rejected) == {bad} and bad not in r.relays
    total, rejected = r.finalize()
    assert rejected == {}
    assert np.array_equal(total, r.expected(r.ids))  # its input still counts


# ------------------------------------------------------------------ stage 4
def _unmask_with(r, bad: int, change) -> tuple[np.ndarray, dict]:
    r.mask({i: y for i, y in r.masked_replies().items() if i != r.ids[7]})  # one dropout
    r.sign()
    replies = r.unmask_replies()
    replies[bad] = change(replies[bad])
    return r.finalize(replies)


def _first(table):
    return sorted(table)[0]


@pytest.mark.parametrize(
    "case",
    [
        "extra share",
        "duplicate share",
        "index 0",
        "wrong index",
        "corrupted self-mask share",
        "corrupted mask-key share",
        "share of a site it does not hold",
        "missing part",
        "not a table",
    ],
)
def test_bad_revealed_shares_drop_the_responder_only(case: str) -> None:
    r = staged(8, k=7, threshold=5, seed=8)
    bad = r.ids[1]
    dropped = r.ids[7]

    def change(reply):
        b, sk = dict(reply[B_SHARES]), dict(reply[SK_SHARES])
        owner = _first(b)
        idx, share = b[owner]
        if case == "extra share":
            b[dropped] = b[owner]
        elif case == "duplicate share":
            other = sorted(b)[1]
            b[other] = b[owner]
        elif case == "index 0":
            b[owner] = (0, share)
        elif case == "wrong index":
            b[owner] = (idx % 8 + 1, share)
        elif case == "corrupted self-mask share":
            b[owner] = (idx, bytes([share[0] ^ 1]) + share[1:])
        elif case == "corrupted mask-key share":
            i2, s2 = sk[dropped]
            sk[dropped] = (i2, bytes(32))
        elif case == "share of a site it does not hold":
            sk[owner] = b[owner]
        elif case == "missing part":
            return {B_SHARES: b, SK_SHARES: sk}
        else:
            return {B_SHARES: list(b.items()), SK_SHARES: sk, SEEDS: reply[SEEDS]}
        return {B_SHARES: b, SK_SHARES: sk, SEEDS: reply[SEEDS]}

    total, rejected = _unmask_with(r, bad, change)
    assert set(rejected) == {bad} and "bad unmask reply" in rejected[bad]
    assert np.array_equal(total, r.expected([i for i in r.ids if i != dropped]))


def test_a_wrong_mask_seed_is_caught_when_the_key_can_be_rebuilt() -> None:
    r = staged(8, k=7, threshold=5, seed=9)
    bad, dropped = r.ids[2], r.ids[7]

    def change(reply):
        return {**reply, SEEDS: {dropped: bytes(32)}}

    total, rejected = _unmask_with(r, bad, change)
    assert set(rejected) == {bad} and "wrong mask seed" in rejected[bad]
    assert np.array_equal(total, r.expected([i for i in r.ids if i != dropped]))


def test_a_dropped_dealer_without_a_usable_key_is_undone_by_the_survivors_seeds() -> None:
    """A dropped site whose mask-key shares are missing (too few holders answered) has
    its masks removed with the seeds its surviving neighbours revealed."""
    r = staged(8, k=7, threshold=5, seed=10)
    dropped = r.ids[0]
    r.mask({i: y for i, y in r.masked_replies().items() if i != dropped})
    r.sign()
    replies = r.unmask_replies()
    for i in list(replies)[:4]:  # 4 of 7 holders withhold their key shares: 3 < t
        replies[i] = {**replies[i], SK_SHARES: {}}
    total, rejected = r.finalize(replies)
    assert rejected == {}
    assert np.array_equal(total, r.expected([i for i in r.ids if i != dropped]))


def test_too_few_replies_abandons_cleanly() -> None:
    r = staged(5, k=4, threshold=3, seed=11)
    r.mask()
    r.sign()
    replies = dict(list(r.unmask_replies().items())[:2])
    with pytest.raises(ProtocolAbort, match="threshold"):
        r.finalize(replies)


# ------------------------------------------------------- property-based
STAGES = ("advert", "shares", "masked", "signature", "unmask")


def _mutate(value: object, how: int, pos: int, other: object) -> object:
    """One of many ways a reply field can be wrong."""
    if how == 0:
        return None
    if how == 1:
        return other
    if how == 2:
        return 7
    if isinstance(value, (bytes, bytearray)):
        if not value:
            return b"\x00"
        p = pos % len(value)
        return [
            value[:p],
            value + b"\x00",
            value[:p] + bytes([value[p] ^ (1 + pos % 255)]) + value[p + 1 :],
            b"",
        ][how % 4]
    if isinstance(value, np.ndarray):
        return [value[:-1], value.astype(np.int64), np.append(value, value[:1]), value.reshape(1, -1)][
            how % 4
        ]
    if isinstance(value, dict):
        keys = sorted(value)
        if not keys:
            return {12345: other}
        k = keys[pos % len(keys)]
        return [
            {kk: vv for kk, vv in value.items() if kk != k},
            {**value, 12345: value[k]},
            {**value, k: _mutate(value[k], how + 1, pos + 1, other)},
            list(value.items()),
        ][how % 4]
    if isinstance(value, tuple):
        p = pos % len(value)
        return value[:p] + (_mutate(value[p], how + 1, pos + 1, other),) + value[p + 1 :]
    return other


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stage=st.sampled_from(STAGES),
    who=st.integers(0, 6),
    how=st.integers(0, 11),
    pos=st.integers(0, 10_000),
    seed=st.integers(0, 2**16),
)
def test_any_mutated_reply_drops_at_most_its_sender(
    stage: str, who: int, how: int, pos: int, seed: int
) -> None:
    """Mutate one field of one site's reply at one stage: the server never raises, names
    only that site, and the sum over everyone it kept is exact."""
    r = make_round(7, k=6, threshold=4, length=16, seed=seed)
    bad = r.ids[who]
    other = r.ids[(who + 1) % 7]
    adverts = r.adverts()
    if stage == "advert":
        adverts[bad] = _mutate(adverts[bad], how, pos, adverts[other])
    rejected = dict(r.advertise(adverts))
    shares = r.share_replies()
    if stage == "shares":
        shares[bad] = _mutate(shares[bad], how, pos, shares[other])
    rejected.update(r.share(shares))
    masked = r.masked_replies()
    shift = np.zeros(16, dtype=np.uint32)
    if stage == "masked" and bad in masked:
        y = masked[bad][0]
        masked[bad] = _mutate(masked[bad], how, pos, masked[other])
        if (
            isinstance(masked[bad], tuple)
            and isinstance(masked[bad][0], np.ndarray)
            and masked[bad][0].dtype == np.uint32
            and masked[bad][0].shape == y.shape
        ):
            shift = masked[bad][0] - y  # a well-formed vector: what a site may send
    rejected.update(r.mask(masked))
    sigs = {i: r.clients[i].sign_view(r.view) for i in r.server.survivors}
    if stage == "signature" and bad in sigs:
        sigs[bad] = _mutate(sigs[bad], how, pos, sigs[other])
    r.relays, bad_sigs = r.server.collect_signatures(sigs)
    rejected.update(bad_sigs)
    replies = r.unmask_replies()
    if stage == "unmask" and bad in replies:
        replies[bad] = _mutate(replies[bad], how, pos, replies[other])
    total, bad_unmask = r.finalize(replies)
    rejected.update(bad_unmask)
    assert set(rejected) <= {bad}, rejected
    if bad not in r.server.survivors:
        shift[:] = 0
    assert np.array_equal(total, r.expected(r.server.survivors) + shift)
    if rejected and stage in ("advert", "shares", "masked"):
        assert bad not in r.server.survivors
