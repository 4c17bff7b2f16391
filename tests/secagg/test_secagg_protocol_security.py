"""Privacy properties, tamper/replay resistance and message validation."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
from common.secagg import (
    ClientState,
    ConfigError,
    InvalidMessageError,
    ProtocolAbort,
    ServerState,
    ShareDecryptionError,
    StageError,
    UnmaskRefusedError,
)


def _masked(r, node: int) -> np.ndarray:
    return r.clients[node].masked_input(r.routed[node], r.vectors[node])


# ------------------------------------------------------------------ privacy
def test_masked_vector_looks_uniform_and_uncorrelated(staged_round) -> None:
    r = staged_round(3, k=2, threshold=2, length=10_000, seed=1)
    node = next(iter(r.clients))
    plain = np.arange(10_000, dtype=np.uint32) * np.uint32(429_497)  # structured input
    y = r.clients[node].masked_input(r.routed[node], plain)
    corr = np.corrcoef(y.astype(np.float64), plain.astype(np.float64))[0, 1]
    assert abs(corr) < 0.05
    assert abs(y.astype(np.float64).mean() / 2**32 - 0.5) < 0.02
    assert not np.array_equal(y, plain)


def test_same_input_gives_different_masked_vectors(staged_round) -> None:
    x = np.full(1000, 7, dtype=np.uint32)
    ys = []
    for _ in range(2):
        r = staged_round(3, k=2, threshold=2, length=1000, seed=2)  # same ids, same round
        node = min(r.clients)
        ys.append(r.clients[node].masked_input(r.routed[node], x))
    assert np.count_nonzero(ys[0] == ys[1]) < 5


def test_server_asking_for_both_shares_of_a_node_is_refused(staged_round) -> None:
    r = staged_round(5, k=4, threshold=3, seed=3)
    ids = sorted(r.clients)
    for i in ids:
        r.server.add_masked_input(i, _masked(r, i))
    victim, asked = ids[0], ids[1]
    with pytest.raises(UnmaskRefusedError, match=rf"\[{victim}\] are listed as both"):
        r.clients[asked].unmask(ids, [victim])
    # the refusal leaves the client able to answer an honest request, once
    reply = r.clients[asked].unmask(ids, [])
    assert victim in reply["b_shares"] and reply["sk_shares"] == {}
    with pytest.raises(StageError):
        r.clients[asked].unmask(ids[1:], [victim])  # second request: refused


def test_client_never_reveals_both_kinds_or_its_own_key_share(staged_round) -> None:
    r = staged_round(5, k=4, threshold=3, seed=4)
    ids = sorted(r.clients)
    for i in ids:
        r.server.add_masked_input(i, _masked(r, i))
    me = ids[2]
    reply = r.clients[me].unmask(ids[:3], ids[3:])  # a lying server: claims 2 dropped
    assert set(reply["b_shares"]) == set(ids[:3])
    assert set(reply["sk_shares"]) == set(ids[3:])
    assert me not in reply["sk_shares"]
    assert not set(reply["b_shares"]) & set(reply["sk_shares"])


def test_unmask_request_below_threshold_is_refused(staged_round) -> None:
    r = staged_round(5, k=4, threshold=3, seed=5)
    ids = sorted(r.clients)
    _masked(r, ids[0])
    with pytest.raises(ProtocolAbort, match="only 2 survivors"):
        r.clients[ids[0]].unmask(ids[:2], ids[2:])


def test_unmask_request_with_unknown_or_duplicate_ids_is_invalid(staged_round) -> None:
    r = staged_round(3, k=2, threshold=2, seed=6)
    ids = sorted(r.clients)
    _masked(r, ids[0])
    with pytest.raises(InvalidMessageError, match="not participants"):
        r.clients[ids[0]].unmask([*ids, 12345], [])
    with pytest.raises(InvalidMessageError, match="duplicate"):
        r.clients[ids[0]].unmask([ids[0], ids[0], ids[1]], [])


# ------------------------------------------------------- tampering / replay
def test_tampered_routed_ciphertext_fails(staged_round) -> None:
    r = staged_round(3, k=2, threshold=2, seed=7)
    receiver = min(r.clients)
    sender = max(r.routed[receiver])
    cts = dict(r.routed[receiver])
    bad = bytearray(cts[sender])
    bad[40] ^= 0x80
    cts[sender] = bytes(bad)
    with pytest.raises(ShareDecryptionError, match=f"share from node {sender}"):
        r.clients[receiver].masked_input(cts, r.vectors[receiver])


@pytest.mark.parametrize("field", ["round_id", "run_id"])
def test_ciphertext_replayed_from_other_round_or_run_fails(field: str, staged_round) -> None:
    """Same node ids and (forcibly) the same keys, other round/run: AD mismatch."""
    kwargs = {"run_id": 11, "round_id": 3}
    other = dict(kwargs)
    other[field] += 1
    r_old = staged_round(3, k=2, threshold=2, seed=8, **other)
    r_new = staged_round(3, k=2, threshold=2, seed=8, **kwargs)
    receiver = min(r_new.clients)
    # make the new round reuse the old round's keys so only the ids in the
    # associated data / KDF differ
    for node, client in r_new.clients.items():
        old = r_old.clients[node]
        client._c_sk, client._c_pk = old._c_sk, old._c_pk
        client._peer_keys = dict(old._peer_keys)
    with pytest.raises(ShareDecryptionError, match="replayed from another round/run"):
        r_new.clients[receiver].masked_input(r_old.routed[receiver], r_new.vectors[receiver])


def test_ciphertext_relayed_to_wrong_receiver_fails(staged_round) -> None:
    r = staged_round(5, k=4, threshold=3, seed=9)
    a, b, c = sorted(r.clients)[:3]
    cts = dict(r.routed[b])
    cts[c] = r.shares[c][a]  # c's ciphertext for a, delivered to b as if from c
    with pytest.raises(ShareDecryptionError, match=f"share from node {c} to node {b}"):
        r.clients[b].masked_input(cts, r.vectors[b])


def test_shares_from_non_neighbour_are_rejected(staged_round) -> None:
    r = staged_round(7, k=2, threshold=2, seed=10)
    ids = sorted(r.clients)
    me, far = ids[0], ids[3]
    cts = dict(r.routed[me])
    cts[far] = next(iter(r.routed[far].values()))
    with pytest.raises(InvalidMessageError, match=f"from node {far}, which is not a neighbour"):
        r.clients[me].masked_input(cts, r.vectors[me])


def test_key_bundle_misstating_own_keys_is_rejected() -> None:
    ids = [1, 2, 3]
    c = ClientState(1, ids, threshold=2, k=2, run_id=0, round_id=0)
    c.advertise_keys()
    other = ClientState(2, ids, threshold=2, k=2, run_id=0, round_id=0).advertise_keys()
    with pytest.raises(InvalidMessageError, match="own public keys"):
        c.share_keys({1: (other["c_pk"], other["s_pk"]), 2: (other["c_pk"], other["s_pk"])})
    with pytest.raises(InvalidMessageError, match="not a participant"):
        c.share_keys({99: (other["c_pk"], other["s_pk"])})


# -------------------------------------------------------- server validation
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda n: np.zeros(n + 1, dtype=np.uint32), r"shape \(33,\)"),
        (lambda n: np.zeros(n - 1, dtype=np.uint32), r"shape \(31,\)"),
        (lambda n: np.zeros((n, 1), dtype=np.uint32), "shape"),
        (lambda n: np.zeros(n, dtype=np.int32), "dtype int32"),
        (lambda n: np.zeros(n, dtype=np.uint64), "dtype uint64"),
        (lambda n: np.zeros(n, dtype=np.float32), "dtype float32"),
        (lambda n: [0] * n, "numpy array"),
    ],
)
def test_malformed_masked_input_is_rejected(make, match: str, staged_round) -> None:
    r = staged_round(3, k=2, threshold=2, length=32, seed=11)
    node = min(r.clients)
    with pytest.raises(InvalidMessageError, match=match):
        r.server.add_masked_input(node, make(32))
    r.server.add_masked_input(node, _masked(r, node))  # state unchanged: still accepted


def test_unknown_and_duplicate_masked_inputs_are_rejected(staged_round) -> None:
    r = staged_round(3, k=2, threshold=2, seed=12)
    ids = sorted(r.clients)
    with pytest.raises(InvalidMessageError, match="not a participant"):
        r.server.add_masked_input(424242, r.vectors[ids[0]])
    y = _masked(r, ids[0])
    r.server.add_masked_input(ids[0], y)
    with pytest.raises(InvalidMessageError, match="duplicate masked input"):
        r.server.add_masked_input(ids[0], y)


def test_masked_input_from_node_that_skipped_key_sharing_is_rejected() -> None:
    ids = [10, 20, 30, 40, 50]
    server = ServerState(ids, threshold=3, k=4, vector_length=4, run_id=1, round_id=1)
    clients = {i: ClientState(i, ids, threshold=3, k=4, run_id=1, round_id=1) for i in ids}
    bundles = server.broadcast_keys({i: c.advertise_keys() for i, c in clients.items()})
    server.route_shares({i: clients[i].share_keys(bundles[i]) for i in ids[:4]})
    with pytest.raises(InvalidMessageError, match="did not complete key sharing"):
        server.add_masked_input(50, np.zeros(4, dtype=np.uint32))


def test_client_rejects_malformed_input_vector(staged_round) -> None:
    r = staged_round(3, k=2, threshold=2, seed=13)
    node = min(r.clients)
    with pytest.raises(InvalidMessageError, match="1-D uint32"):
        r.clients[node].masked_input(r.routed[node], np.zeros(32, dtype=np.float64))


def test_server_rejects_bad_advertisements_and_share_routing() -> None:
    ids = [1, 2, 3, 4, 5]
    server = ServerState(ids, threshold=3, k=4, vector_length=4, run_id=1, round_id=1)
    clients = {i: ClientState(i, ids, threshold=3, k=4, run_id=1, round_id=1) for i in ids}
    adverts = {i: c.advertise_keys() for i, c in clients.items()}
    with pytest.raises(InvalidMessageError, match="not a participant"):
        server.broadcast_keys({**adverts, 9: adverts[1]})
    with pytest.raises(InvalidMessageError, match="duplicates a public key"):
        server.broadcast_keys({**adverts, 2: adverts[1]})
    with pytest.raises(InvalidMessageError, match="32 bytes"):
        server.broadcast_keys({**adverts, 2: {"c_pk": b"x", "s_pk": adverts[2]["s_pk"]}})
    with pytest.raises(InvalidMessageError, match="s_pk of node 3 is a low-order point"):
        server.broadcast_keys({**adverts, 3: {"c_pk": adverts[3]["c_pk"], "s_pk": bytes(32)}})
    bundles = server.broadcast_keys(adverts)  # failed calls left the state unchanged
    shares = {i: clients[i].share_keys(bundles[i]) for i in ids}
    partial = dict(shares)
    partial[1] = {r: ct for r, ct in shares[1].items() if r != 2}
    with pytest.raises(InvalidMessageError, match="addressed shares"):
        server.route_shares(partial)
    truncated = dict(shares)
    truncated[1] = {r: ct[:-1] for r, ct in shares[1].items()}
    with pytest.raises(InvalidMessageError, match="bytes"):
        server.route_shares(truncated)
    assert set(server.route_shares(shares)) == set(ids)


def test_server_rejects_unmask_reply_with_shares_it_cannot_hold(staged_round) -> None:
    r = staged_round(7, k=2, threshold=2, seed=14)
    ids = sorted(r.clients)
    for i in ids[:6]:
        r.server.add_masked_input(i, _masked(r, i))
    survivors, dropped = r.server.unmask_request()
    assert dropped == [ids[6]]
    replies = {i: r.clients[i].unmask(survivors, dropped) for i in survivors}
    forged = {**replies, ids[3]: {"b_shares": dict(replies[ids[3]]["b_shares"]),
                                  "sk_shares": {ids[6]: (1, bytes(32))}}}
    with pytest.raises(InvalidMessageError, match="does not hold"):
        r.server.finalize(forged)
    with pytest.raises(InvalidMessageError, match="not a survivor"):
        r.server.finalize({**replies, ids[6]: replies[ids[0]]})
    expected = np.zeros(32, dtype=np.uint32)
    for i in survivors:
        expected += r.vectors[i]
    assert np.array_equal(r.server.finalize(replies), expected)


def test_missing_mask_key_shares_abort(staged_round) -> None:
    r = staged_round(5, k=4, threshold=3, seed=15)
    ids = sorted(r.clients)
    for i in ids[1:]:
        r.server.add_masked_input(i, _masked(r, i))
    survivors, dropped = r.server.unmask_request()
    replies = {i: r.clients[i].unmask(survivors, dropped) for i in survivors}
    for i in survivors[2:]:
        replies[i]["sk_shares"] = {}
    with pytest.raises(ProtocolAbort, match=rf"only 2 mask-key shares of dropped node {ids[0]}"):
        r.server.finalize(replies)


def test_corrupted_mask_key_share_is_detected(staged_round) -> None:
    r = staged_round(5, k=4, threshold=3, seed=16)
    ids = sorted(r.clients)
    for i in ids[1:]:
        r.server.add_masked_input(i, _masked(r, i))
    survivors, dropped = r.server.unmask_request()
    replies = {i: r.clients[i].unmask(survivors, dropped) for i in survivors}
    idx, share = replies[survivors[0]]["sk_shares"][ids[0]]
    replies[survivors[0]]["sk_shares"][ids[0]] = (idx, bytes(b ^ 1 for b in share))
    with pytest.raises(ProtocolAbort, match="does not match its public key"):
        r.server.finalize(replies)


def test_stage_order_is_enforced() -> None:
    ids = [1, 2, 3]
    client = ClientState(1, ids, threshold=2, k=2, run_id=0, round_id=0)
    with pytest.raises(StageError, match="cannot share keys"):
        client.share_keys({})
    client.advertise_keys()
    with pytest.raises(StageError):
        client.advertise_keys()
    server = ServerState(ids, threshold=2, k=2, vector_length=3, run_id=0, round_id=0)
    with pytest.raises(StageError):
        server.add_masked_input(1, np.zeros(3, dtype=np.uint32))
    with pytest.raises(StageError):
        server.finalize({})


def test_invalid_round_parameters() -> None:
    with pytest.raises(ConfigError, match="not in the round's participant list"):
        ClientState(9, [1, 2, 3], threshold=2, k=2, run_id=0, round_id=0)
    with pytest.raises(ConfigError, match="strict majority"):
        ServerState([1, 2, 3, 4, 5], threshold=2, k=4, vector_length=1, run_id=0, round_id=0)


# ------------------------------------------------------------ hygiene
_PKG = Path(__file__).resolve().parents[2] / "common" / "secagg"


def test_package_imports_only_allowed_modules() -> None:
    for path in sorted(_PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "Crypto":
                    assert name == "Crypto.Protocol.SecretSharing", (path.name, name)
                else:
                    assert top in {"numpy", "cryptography"} or top in sys.stdlib_module_names
                assert top != "random" and not name.startswith("numpy." + "random"), name


def test_no_forbidden_words_or_prints() -> None:
    forbidden = ["Random" + "State", "np.random" + ".seed", "random" + ".seed", "print("]
    for path in [*_PKG.glob("*.py"), *Path(__file__).parent.glob("*.py")]:
        text = path.read_text()
        for word in forbidden:
            if word == "print(" and path.parent != _PKG:
                continue
            assert word not in text, (path.name, word)
        if path.parent == _PKG:
            assert "np.random" not in text and "import random" not in text, path.name
