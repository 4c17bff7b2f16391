"""A server that lies (about dropouts, keys, routing) against honest sites.

Each test plays the server: it runs the honest sites' real ``ClientState``
objects, sends them whatever it likes, collects everything they reveal, and
then checks with :func:`unmask_one` whether it can recover one site's input on
its own. ``unmask_one`` is shown to work (it does recover an input when a site
is made to answer twice), so a ``None`` from it is a real failure of the attack.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from conftest import make_round, staged

from fedseal.common.secagg import (
    Advert,
    ClientState,
    InvalidMessageError,
    ProtocolAbort,
    RoundContext,
    ShareMessage,
    StageError,
    UnmaskRefusedError,
    View,
    agree,
    combine_shares,
    default_k,
    default_threshold,
    expand_mask,
    generate_key_pair,
    make_identities,
)
from fedseal.common.secagg.crypto import public_key_from_private
from fedseal.common.secagg.messages import PURPOSE_VIEW, ShareEntry, ciphertext_digest
from fedseal.common.secagg.protocol import PURPOSE_MASK


# ------------------------------------------------------------- the adversary
def view_of(r, survivors, dropped) -> bytes:
    fp = {i: r.identities[i].fingerprint for i in r.ids}
    return View({i: fp[i] for i in survivors}, {j: fp[j] for j in dropped}).body(r.ctx.digest)


def masked_all(r) -> dict[int, np.ndarray]:
    """Stage 2, honest routing: every site's masked vector (the server keeps them all)."""
    return {i: r.clients[i].masked_input(r.opened(i), r.vectors[i])[0] for i in r.routed}


def ask(r, views: dict[int, bytes], clients=None) -> tuple[dict, dict, dict]:
    """Stages 3-4 with a per-site view: collect every signature, then send each signer its
    view with all signatures anyone gave on that same view. Returns (replies, refused
    at signing, refused at unmasking)."""
    clients = clients or r.clients
    sigs, refused_sign = {}, {}
    for i, view in views.items():
        try:
            sigs[i] = clients[i].sign_view(view)
        except UnmaskRefusedError as exc:
            refused_sign[i] = str(exc)
    replies, refused_unmask = {}, {}
    for i in sigs:
        same = {j: s for j, s in sigs.items() if views[j] == views[i]}
        try:
            replies[i] = clients[i].unmask(views[i], same)
        except UnmaskRefusedError as exc:
            refused_unmask[i] = str(exc)
    return replies, refused_sign, refused_unmask


def unmask_one(r, target: int, y: np.ndarray, replies, masking) -> np.ndarray | None:
    """What a server holding ``replies`` (from any number of views) can do about one site:
    its input if it can remove every mask of ``y``, else None."""
    t, ctx = r.ctx.threshold, r.ctx
    adverts = {i: a for b in r.bundles.values() for i, a in b.items()}

    def secret(owner: int, part: str) -> bytes | None:
        shares = {rep[part][owner] for rep in replies.values() if owner in rep[part]}
        return combine_shares(sorted(shares), t) if len(shares) >= t else None

    b = secret(target, "b_shares")
    if b is None:
        return None
    x = y - expand_mask(b, len(y))
    sk_target = secret(target, "sk_shares")
    for j in sorted(masking[target]):
        seed = replies.get(target, {}).get("seeds", {}).get(j) or replies.get(j, {}).get("seeds", {}).get(
            target
        )
        for owner, other in ((j, target), (target, j)):
            sk = sk_target if owner == target else secret(j, "sk_shares")
            if seed is None and sk is not None and public_key_from_private(sk) == adverts[owner].s_pk:
                seed = agree(
                    sk,
                    adverts[other].s_pk,
                    run_id=ctx.run_id,
                    round_id=ctx.round_id,
                    node_a=owner,
                    node_b=other,
                    purpose=PURPOSE_MASK,
                )
        if seed is None:
            return None
        mask = expand_mask(seed, len(y))
        x = x - mask if j > target else x + mask
    return x


def masking_sets(r) -> dict[int, set[int]]:
    return {i: set(r.routed[i]) for i in r.routed}


# ----------------------------------------------------- the evaluator works
def test_a_site_made_to_answer_twice_gives_its_input_away() -> None:
    """Positive control for :func:`unmask_one`: sites that answer two views (here: two
    copies of each state, as a site without a durable record would after a restart) give
    one site's input away: first everyone survived, then the target "dropped"."""
    r = staged(14, k=default_k(14), threshold=default_threshold(default_k(14)), seed=1)
    target = r.ids[5]
    ys = masked_all(r)
    saved = {i: c.export_state() for i, c in r.clients.items()}

    def clones():
        return {
            i: ClientState.restore_state(s, identity=r.identities[i], roster=r.roster)
            for i, s in saved.items()
        }

    first, _, _ = ask(r, {i: view_of(r, r.ids, []) for i in r.ids}, clones())
    others = [i for i in r.ids if i != target]
    second, _, _ = ask(r, {i: view_of(r, others, [target]) for i in others}, clones())
    assert unmask_one(r, target, ys[target], first, masking_sets(r)) is None
    merged = {**first, **{f"again-{i}": rep for i, rep in second.items()}}
    x = unmask_one(r, target, ys[target], merged, masking_sets(r))
    assert x is not None and np.array_equal(x, r.vectors[target])


# ------------------------------------------------ the lies, now failing
@pytest.mark.parametrize("n", [14, 16, 20, 50])
def test_consistent_lie_about_a_targets_neighbours_reveals_nothing(n: int) -> None:
    """One view for everyone: the target's neighbours dropped, everyone else survived."""
    k = default_k(n)
    r = staged(n, k=k, threshold=default_threshold(min(k, n - 1)), seed=n)
    target = r.ids[n // 2]
    ys = masked_all(r)
    nbrs = set(r.ctx.graph[target])
    lie = view_of(r, [i for i in r.ids if i not in nbrs], sorted(nbrs))
    replies, refused_sign, _ = ask(r, {i: lie for i in r.ids})
    assert "own share holders survived" in refused_sign[target]
    assert all("listed as dropped" in refused_sign[j] for j in nbrs)
    assert unmask_one(r, target, ys[target], replies, masking_sets(r)) is None
    assert not any(target in rep["b_shares"] for rep in replies.values())


@pytest.mark.parametrize("n,k,t", [(14, 8, 6), (20, 10, 7), (5, 2, 2), (6, 2, 2)])
def test_a_different_list_per_site_reveals_nothing(n: int, k: int, t: int) -> None:
    """The target and its neighbours are told everyone survived (they would reveal the
    target's self-mask share); everyone else is told the neighbours dropped (they would
    reveal the neighbours' mask keys)."""
    r = staged(n, k=k, threshold=t, seed=n + k)
    target = r.ids[0]
    ys = masked_all(r)
    nbrs = set(r.ctx.graph[target])
    honest = view_of(r, r.ids, [])
    lie = view_of(r, [i for i in r.ids if i not in nbrs], sorted(nbrs))
    views = {i: honest if i in nbrs | {target} else lie for i in r.ids}
    replies, refused_sign, refused_unmask = ask(r, views)
    assert unmask_one(r, target, ys[target], replies, masking_sets(r)) is None
    # the neighbours' keys stay hidden: nobody reveals a mask-key share of any of them
    assert not any(set(rep["sk_shares"]) & nbrs for rep in replies.values())
    assert refused_unmask  # some sites saw that their view lacks a quorum


@pytest.mark.parametrize("n,k,t", [(14, 8, 6), (5, 2, 2)])
def test_a_personal_list_for_every_neighbour_reveals_nothing(n: int, k: int, t: int) -> None:
    """Each neighbour of the target is told it alone (with the target) survived among the
    target's neighbours; everyone else that those neighbours dropped."""
    r = staged(n, k=k, threshold=t, seed=3 * n)
    target = r.ids[2]
    ys = masked_all(r)
    nbrs = sorted(r.ctx.graph[target])
    others = [i for i in r.ids if i not in nbrs]
    views = {j: view_of(r, [*others, j], [m for m in nbrs if m != j]) for j in nbrs}
    views.update({i: view_of(r, others, nbrs) for i in others})
    replies, _, _ = ask(r, views)
    assert unmask_one(r, target, ys[target], replies, masking_sets(r)) is None


def test_lies_at_k2_t2_with_five_sites_reveal_nothing() -> None:
    """k = 2, t = 2 (the smallest a site accepts, with --max-colluders 0) at n = 5: every split of
    the five sites into two views, for every target."""
    r = staged(5, k=2, threshold=2, seed=7)
    ys = masked_all(r)
    saved = {i: c.export_state() for i, c in r.clients.items()}
    for target in r.ids:
        nbrs = set(r.ctx.graph[target])
        lie = view_of(r, [i for i in r.ids if i not in nbrs], sorted(nbrs))
        honest = view_of(r, r.ids, [])
        for size in range(6):
            for group in itertools.combinations(r.ids, size):
                clients = {
                    i: ClientState.restore_state(s, identity=r.identities[i], roster=r.roster)
                    for i, s in saved.items()
                }
                views = {i: honest if i in group else lie for i in r.ids}
                replies, _, _ = ask(r, views, clients)
                assert unmask_one(r, target, ys[target], replies, masking_sets(r)) is None


def test_random_lies_and_routing_never_isolate_a_site() -> None:
    """A randomised liar: it omits routed shares (asymmetric masking), then splits the
    sites into groups with random survivor/dropped lists; no site's input is ever
    recoverable from everything the honest sites reveal."""
    rng = random.Random(11)
    for trial in range(16):
        n = rng.choice([5, 6, 7, 8, 9])
        k = rng.choice(sorted({n - 1, *range(2, n - 1, 2)}))
        ke = min(k, n - 1)
        t = (ke + 1) // 2 + 1 if rng.random() < 0.7 else default_threshold(ke)
        r = staged(n, k=k, threshold=t, seed=100 + trial)
        routed = {i: dict(v) for i, v in r.routed.items()}
        for i in routed:  # drop some routed shares, keeping t - 1 so sites go on
            drop = [s for s in routed[i] if rng.random() < 0.3]
            for s in drop[: max(0, len(routed[i]) - (t - 1))]:
                del routed[i][s]
        ys, masking = {}, {}
        for i in r.ids:
            try:
                ys[i] = r.clients[i].masked_input(r.opened(i, routed), r.vectors[i])[0]
                masking[i] = set(routed[i])
            except ProtocolAbort:
                pass
        groups = [rng.randrange(3) for _ in r.ids]
        lists = []
        for _ in range(3):
            surv = [i for i in r.ids if rng.random() < 0.6]
            lists.append(view_of(r, surv, [i for i in r.ids if i not in surv and rng.random() < 0.8]))
        views = {i: lists[g] for i, g in zip(r.ids, groups) if i in ys}
        replies, _, _ = ask(r, views)
        for target in ys:
            assert unmask_one(r, target, ys[target], replies, masking) is None, (trial, target)


# -------------------------------------------------------- keys: Sybils, swaps
def test_sybil_sites_signed_by_keys_outside_the_roster_are_refused() -> None:
    r = make_round(5, k=4, threshold=3, seed=20)
    r.advertise()
    victim = r.ids[0]
    sybil = r.ids[1]
    fake_ids, fake_roster = make_identities([sybil], "ed25519")
    impostor = ClientState(sybil, r.ctx, identity=fake_ids[sybil], roster=fake_roster)
    bundle = dict(r.bundles[victim])
    bundle[sybil] = impostor.advertise_keys()
    with pytest.raises(InvalidMessageError, match="not in this site's roster"):
        r.clients[victim].share_keys(bundle)
    # the refusal changed nothing: the real bundle is still accepted
    r.clients[victim].share_keys(r.bundles[victim])


def test_substituted_or_replayed_keys_are_refused() -> None:
    r = make_round(5, k=4, threshold=3, seed=21)
    r.advertise()
    victim, other = r.ids[0], r.ids[1]
    real = r.bundles[victim][other]
    _, fresh = generate_key_pair()
    swapped = Advert(real.node, real.signer, real.c_send, fresh, real.recv, real.pop, real.signature)
    with pytest.raises(InvalidMessageError, match="does not verify"):
        r.clients[victim].share_keys({**r.bundles[victim], other: swapped})
    # the same site's genuine advert from another round (same keys, other context)
    old = RoundContext(r.ctx.run_id, r.ctx.round_id - 1, r.ids, r.ctx.k, r.ctx.threshold, r.ctx.challenge)
    replay_client = ClientState(other, old, identity=r.identities[other], roster=r.roster)
    replayed = replay_client.advertise_keys()
    with pytest.raises(InvalidMessageError, match="does not verify"):
        r.clients[victim].share_keys({**r.bundles[victim], other: replayed})


def test_one_key_for_two_sites_is_refused() -> None:
    """A member that signs as two node ids (a Sybil by a malicious member) is caught."""
    r = make_round(5, k=4, threshold=3, seed=22)
    r.advertise()
    victim, a, b = r.ids[0], r.ids[1], r.ids[2]
    double = ClientState(b, r.ctx, identity=r.identities[a], roster=r.roster)
    with pytest.raises(InvalidMessageError, match="same key"):
        r.clients[victim].share_keys({**r.bundles[victim], b: double.advertise_keys()})


def test_views_naming_foreign_or_swapped_keys_are_refused() -> None:
    r = staged(5, k=4, threshold=3, seed=23)
    masked_all(r)
    me, other = r.ids[0], r.ids[1]
    fp = {i: r.identities[i].fingerprint for i in r.ids}
    swapped = View({**fp, other: fp[r.ids[2]]}, {}).body(r.ctx.digest)
    with pytest.raises(UnmaskRefusedError, match="another signing key"):
        r.clients[me].sign_view(swapped)
    far = {i: f for i, f in fp.items()}
    far[other] = bytes(32)
    with pytest.raises(UnmaskRefusedError, match="another signing key|not in this site's roster"):
        r.clients[me].sign_view(View(far, {}).body(r.ctx.digest))


def test_signatures_from_outside_the_roster_do_not_make_a_quorum() -> None:
    r = staged(5, k=4, threshold=3, seed=24)
    masked_all(r)
    view = view_of(r, r.ids, [])
    me = r.ids[0]
    r.clients[me].sign_view(view)
    outsiders, _ = make_identities(r.ids, "ed25519")
    forged = {i: outsiders[i].sign(PURPOSE_VIEW, view) for i in r.ids if i != me}
    with pytest.raises(UnmaskRefusedError, match="valid signatures"):
        r.clients[me].unmask(view, forged)


def test_unmask_request_for_another_view_than_the_signed_one_is_refused() -> None:
    r = staged(5, k=4, threshold=3, seed=25)
    masked_all(r)
    me = r.ids[0]
    r.clients[me].sign_view(view_of(r, r.ids, []))
    with pytest.raises(UnmaskRefusedError, match="different view"):
        r.clients[me].unmask(view_of(r, r.ids[:4], [r.ids[4]]), {})


# ----------------------------------------------------------- view rules
@pytest.mark.parametrize(
    "case,match",
    [
        ("self-dropped", "listed as dropped"),
        ("both", "both as survivors and as dropped"),
        ("neighbour-unlisted", "in neither list"),
        ("stranger", "not participants"),
        ("too-few-holders", "own share holders survived"),
    ],
)
def test_survivor_views_that_break_the_rules_are_not_signed(case: str, match: str) -> None:
    r = staged(7, k=4, threshold=3, seed=26)
    masked_all(r)
    me = r.ids[3]
    nbrs = r.ctx.graph[me]
    fp = {i: r.identities[i].fingerprint for i in r.ids}
    surv, drop = dict(fp), {}
    if case == "self-dropped":
        drop[me] = surv.pop(me)
    elif case == "both":
        drop[nbrs[0]] = fp[nbrs[0]]
    elif case == "neighbour-unlisted":
        del surv[nbrs[0]]
    elif case == "stranger":
        surv[12345] = fp[me]
    else:
        for j in nbrs[:3]:
            drop[j] = surv.pop(j)
    with pytest.raises(UnmaskRefusedError, match=match):
        r.clients[me].sign_view(View(surv, drop).body(r.ctx.digest))
    assert r.clients[me].sign_view(view_of(r, r.ids, []))  # state unchanged: honest view ok


def test_a_neighbour_listed_that_never_sent_shares_is_refused() -> None:
    """The server withheld a neighbour's shares (asymmetric masking) but lists it."""
    r = staged(7, k=4, threshold=3, seed=27)
    me = r.ids[3]
    other = r.ctx.graph[me][0]
    routed = {s: v for s, v in r.routed[me].items() if s != other}
    r.clients[me].masked_input(r.opened(me, {me: routed}), r.vectors[me])
    with pytest.raises(UnmaskRefusedError, match="never sent it shares"):
        r.clients[me].sign_view(view_of(r, r.ids, []))


def test_fewer_survivors_than_the_sites_minimum_cohort_are_refused() -> None:
    r = make_round(5, k=4, threshold=3, seed=28, min_survivors=5)
    r.advertise()
    r.share()
    masked_all(r)
    with pytest.raises(UnmaskRefusedError, match="minimum cohort of 5"):
        r.clients[r.ids[0]].sign_view(view_of(r, r.ids[:4], [r.ids[4]]))


def test_sites_sign_one_view_and_answer_once() -> None:
    r = staged(5, k=4, threshold=3, seed=29)
    r.mask()
    me = r.ids[0]
    r.sign()
    with pytest.raises(StageError):
        r.clients[me].sign_view(r.view)
    r.unmask_replies()
    with pytest.raises(StageError):
        r.clients[me].unmask(r.view, r.relays[me])


# -------------------------------------------------------------- routing lies
def test_an_altered_ciphertext_makes_the_site_leave_without_revealing_a_key() -> None:
    r = staged(5, k=4, threshold=3, seed=30)
    me = r.ids[0]
    sender = next(iter(r.routed[me]))
    message, ct = r.routed[me][sender]
    bad = bytearray(ct)
    bad[20] ^= 1
    routed = {**r.routed[me], sender: (message, bytes(bad))}
    with pytest.raises(UnmaskRefusedError, match="not the one node .* signed"):
        r.clients[me].masked_input(r.opened(me, {me: routed}), r.vectors[me])


def test_a_forged_share_message_makes_the_site_leave_without_revealing_a_key() -> None:
    r = staged(5, k=4, threshold=3, seed=31)
    me = r.ids[0]
    sender = next(iter(r.routed[me]))
    message, _ = ShareMessage.decode(r.routed[me][sender][0])
    bad_ct = bytes(len(r.routed[me][sender][1]))
    entries = tuple(
        e
        if e.holder != me
        else ShareEntry(e.holder, e.index, e.commit_b, e.commit_sk, ciphertext_digest(bad_ct))
        for e in message.entries
    )
    forged = ShareMessage(message.owner, message.seed, entries, b"\x01" * 64)
    opened = {**r.opened(me), sender: (forged, bad_ct)}
    with pytest.raises(UnmaskRefusedError, match="not signed by node"):
        r.clients[me].masked_input(opened, r.vectors[me])


def test_opening_the_routed_shares_changes_nothing_and_binds_the_mask_to_its_state() -> None:
    """A site opens its routed shares before it trains (so a lie costs it no budget): opening
    leaves the state as it was, a refused opening can be followed by an honest one, and
    shares opened by one state object mask no other's input, not even its restored twin's."""
    r = staged(5, k=4, threshold=3, seed=32)
    me, other = r.ids[0], r.ids[1]
    sender = next(iter(r.routed[me]))
    message, ct = r.routed[me][sender]
    lie = {**r.routed[me], sender: (message, ct[:-1] + bytes([ct[-1] ^ 1]))}
    before = r.clients[me].export_state()
    with pytest.raises(UnmaskRefusedError):
        r.clients[me].open_shares(r.opened(me, {me: lie}))
    opened = r.clients[me].open_shares(r.opened(me))
    assert r.clients[me].export_state() == before
    with pytest.raises(InvalidMessageError, match="another round state opened"):
        r.clients[other].mask(opened, r.vectors[other])
    twin = ClientState.restore_state(
        r.clients[me].export_state(), identity=r.clients[me].identity, roster=r.clients[me].roster
    )
    with pytest.raises(InvalidMessageError, match="another round state opened"):
        twin.mask(opened, r.vectors[me])  # the same round and node, another object
    y, complaints = r.clients[me].mask(opened, r.vectors[me])
    assert complaints == {} and y.shape == r.vectors[me].shape and not np.array_equal(y, r.vectors[me])
    with pytest.raises(StageError):
        r.clients[me].mask(opened, r.vectors[me])
