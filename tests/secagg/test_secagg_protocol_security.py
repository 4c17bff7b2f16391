"""Privacy basics, replay resistance, stage order and package hygiene."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_round, staged
from source_imports import absolute_imports

from fedseal.common.secagg import (
    ClientState,
    ConfigError,
    InvalidMessageError,
    RoundContext,
    ServerState,
    StageError,
    UnmaskRefusedError,
    generate_key_pair,
    make_identities,
)
from fedseal.common.secagg.protocol import B_SHARES, SEEDS, SK_SHARES


# ------------------------------------------------------------------ privacy
def test_masked_vector_looks_uniform_and_uncorrelated() -> None:
    r = staged(3, k=2, threshold=2, length=10_000, seed=1)
    node = r.ids[0]
    plain = np.arange(10_000, dtype=np.uint32) * np.uint32(429_497)  # structured input
    y, complaints = r.clients[node].masked_input(r.opened(node), plain)
    assert complaints == {}
    corr = np.corrcoef(y.astype(np.float64), plain.astype(np.float64))[0, 1]
    assert abs(corr) < 0.05
    assert abs(y.astype(np.float64).mean() / 2**32 - 0.5) < 0.02
    assert not np.array_equal(y, plain)


def test_same_input_gives_different_masked_vectors() -> None:
    x = np.full(1000, 7, dtype=np.uint32)
    ys = []
    for _ in range(2):
        r = staged(3, k=2, threshold=2, length=1000, seed=2)  # same ids, same round
        node = r.ids[0]
        ys.append(r.clients[node].masked_input(r.opened(node), x)[0])
    assert np.count_nonzero(ys[0] == ys[1]) < 5


def test_a_site_never_reveals_both_kinds_or_its_own_key_share() -> None:
    r = staged(7, k=6, threshold=4, seed=4)
    gone = r.ids[5:]
    r.mask({i: y for i, y in r.masked_replies().items() if i not in gone})
    r.sign()
    replies = r.unmask_replies()
    for me, reply in replies.items():
        assert set(reply[B_SHARES]) == set(r.ids[:5])
        assert set(reply[SK_SHARES]) == set(reply[SEEDS]) == set(gone)
        assert me not in reply[SK_SHARES]
    total, rejected = r.finalize(replies)
    assert rejected == {} and np.array_equal(total, r.expected(r.ids[:5]))


# ------------------------------------------------------- replay / routing
@pytest.mark.parametrize("field", ["round_id", "run_id"])
def test_shares_replayed_from_another_round_or_run_are_refused(field: str) -> None:
    """The same sites, keys and ids in another round or run: every signature and
    commitment binds the round's context, so old shares are detected as altered."""
    kwargs = {"run_id": 11, "round_id": 3}
    old = staged(3, k=2, threshold=2, seed=8, **{**kwargs, field: kwargs[field] + 1})
    new = staged(3, k=2, threshold=2, seed=8, **kwargs)
    me = new.ids[0]
    with pytest.raises(UnmaskRefusedError, match="altered"):
        new.clients[me].masked_input(new.opened(me, old.routed), new.vectors[me])


def test_shares_from_outside_the_bundle_are_refused() -> None:
    r = staged(7, k=2, threshold=2, seed=10)
    me, far = r.ids[0], r.ids[3]
    routed = {**r.routed[me], far: next(iter(r.routed[far].values()))}
    with pytest.raises(InvalidMessageError, match=f"from node {far}, which is not a neighbour"):
        r.clients[me].masked_input(r.opened(me, {me: routed}), r.vectors[me])


def test_a_bundle_entry_for_the_site_itself_or_a_stranger_is_refused() -> None:
    r = make_round(5, k=4, threshold=3, seed=12)
    r.advertise()
    me = r.ids[0]
    own = r.clients[r.ids[1]]
    with pytest.raises(InvalidMessageError, match="not a neighbour"):
        r.clients[me].share_keys({**r.bundles[me], me: r.bundles[own.node_id][me]})
    with pytest.raises(InvalidMessageError, match="not a neighbour"):
        r.clients[me].share_keys({99: r.bundles[me][r.ids[1]]})


def test_client_rejects_malformed_input_vector() -> None:
    r = staged(3, k=2, threshold=2, seed=13)
    node = r.ids[0]
    with pytest.raises(InvalidMessageError, match="1-D uint32"):
        r.clients[node].masked_input(r.opened(node), np.zeros(32, dtype=np.float64))


# -------------------------------------------------------------- stage order
def test_stage_order_is_enforced() -> None:
    r = make_round(3, k=2, threshold=2, seed=14)
    client = r.clients[r.ids[0]]
    with pytest.raises(StageError, match="cannot share keys"):
        client.share_keys({})
    client.advertise_keys()
    with pytest.raises(StageError):
        client.advertise_keys()
    with pytest.raises(StageError):
        client.sign_view(b"")
    with pytest.raises(StageError):
        r.server.collect_masked({})
    with pytest.raises(StageError):
        r.server.finalize({})


def test_invalid_round_parameters() -> None:
    ids, (roster_ids, roster) = [1, 2, 3], make_identities([1, 2, 3], "ed25519")
    sk, pk = generate_key_pair()
    ctx = RoundContext(0, 0, ids, 2, 2, pk)
    with pytest.raises(ConfigError, match="not in the round's participant list"):
        ClientState(9, ctx, identity=roster_ids[1], roster=roster)
    with pytest.raises(ConfigError, match="strict majority"):
        RoundContext(0, 0, [1, 2, 3, 4, 5], 4, 2, pk)
    with pytest.raises(ConfigError, match="challenge private key"):
        ServerState(ctx, challenge_private=generate_key_pair()[0], vector_length=1)
    with pytest.raises(InvalidMessageError, match="challenge key"):
        RoundContext(0, 0, ids, 2, 2, b"short")


# ------------------------------------------------------------ hygiene
_PKG = Path(__file__).resolve().parents[2] / "common" / "secagg"


def test_package_imports_only_allowed_modules() -> None:
    for path in sorted(_PKG.glob("*.py")):
        for _, name in absolute_imports(path):
            top = name.split(".")[0]
            if top == "Crypto":
                assert name == "Crypto.Protocol.SecretSharing", (path.name, name)
            else:
                # the one fedseal module allowed: the root of the error family, a leaf itself
                assert (
                    name == "fedseal.common.errors"
                    or top in {"numpy", "cryptography"}
                    or top in sys.stdlib_module_names
                ), (path.name, name)
            assert top != "random" and not name.startswith("numpy." + "random"), name


def test_no_forbidden_words_or_prints() -> None:
    forbidden = ["Random" + "State", "np.random" + ".seed", "random" + ".seed"]
    for path in [*_PKG.glob("*.py"), *Path(__file__).parent.glob("*.py")]:
        text = path.read_text()
        for word in forbidden:
            assert word not in text, (path.name, word)
        if path.parent == _PKG:
            assert "np.random" not in text and "import random" not in text, path.name
            calls = [
                n.func.id
                for n in ast.walk(ast.parse(text))
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            ]
            assert "print" not in calls, path.name
