"""Key agreement and authenticated share encryption."""

from __future__ import annotations

import pytest

from fedseal.common.secagg import (
    InvalidMessageError,
    ShareDecryptionError,
    agree,
    decrypt_share,
    encrypt_share,
    generate_key_pair,
    public_key_from_private,
)

RUN, ROUND = 2**64 - 1, 7
A, B, C = 5, 2**63 + 9, 77


def _agree(sk: bytes, pk: bytes, a: int = A, b: int = B, **kw) -> bytes:
    args = {"run_id": RUN, "round_id": ROUND, "node_a": a, "node_b": b, "purpose": b"mask"}
    args.update(kw)
    return agree(sk, pk, **args)


def test_key_pair_is_raw_x25519() -> None:
    sk, pk = generate_key_pair()
    assert len(sk) == 32 and len(pk) == 32
    assert public_key_from_private(sk) == pk
    assert generate_key_pair() != (sk, pk)


def test_agree_symmetric_and_domain_separated() -> None:
    sk_a, pk_a = generate_key_pair()
    sk_b, pk_b = generate_key_pair()
    k_ab = _agree(sk_a, pk_b, A, B)
    k_ba = _agree(sk_b, pk_a, B, A)
    assert k_ab == k_ba and len(k_ab) == 32
    assert _agree(sk_a, pk_b, purpose=b"share-enc") != k_ab
    assert _agree(sk_a, pk_b, round_id=ROUND + 1) != k_ab
    assert _agree(sk_a, pk_b, run_id=0) != k_ab
    assert _agree(sk_a, pk_b, A, C) != k_ab


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "x" * 32])
def test_agree_rejects_malformed_peer_key(bad) -> None:
    sk, _ = generate_key_pair()
    with pytest.raises(InvalidMessageError, match="bytes"):
        _agree(sk, bad)


def test_agree_rejects_low_order_point() -> None:
    sk, _ = generate_key_pair()
    with pytest.raises(InvalidMessageError, match="low-order"):
        _agree(sk, bytes(32))


@pytest.mark.parametrize("node", [-1, 2**64, 1.5, True])
def test_agree_rejects_bad_node_ids(node) -> None:
    sk, pk = generate_key_pair()
    with pytest.raises(InvalidMessageError):
        _agree(sk, pk, node, B)


def _enc(key: bytes, msg: bytes = b"secret share payload", **kw) -> bytes:
    args = {"sender": A, "receiver": B, "run_id": RUN, "round_id": ROUND}
    args.update(kw)
    return encrypt_share(key, msg, **args)


def _dec(key: bytes, ct: bytes, **kw) -> bytes:
    args = {"sender": A, "receiver": B, "run_id": RUN, "round_id": ROUND}
    args.update(kw)
    return decrypt_share(key, ct, **args)


@pytest.fixture
def key() -> bytes:
    sk_a, _ = generate_key_pair()
    _, pk_b = generate_key_pair()
    return _agree(sk_a, pk_b, purpose=b"share-enc")


def test_roundtrip_and_fresh_nonce(key: bytes) -> None:
    ct1, ct2 = _enc(key), _enc(key)
    assert ct1 != ct2  # random nonce
    assert _dec(key, ct1) == _dec(key, ct2) == b"secret share payload"


@pytest.mark.parametrize("position", [0, 11, 12, 20, -1])
def test_tampered_ciphertext_fails(key: bytes, position: int) -> None:
    ct = bytearray(_enc(key))
    ct[position] ^= 0x01
    with pytest.raises(ShareDecryptionError, match=f"share from node {A}.*failed authentication"):
        _dec(key, bytes(ct))


@pytest.mark.parametrize(
    "field,value",
    [("round_id", ROUND + 1), ("run_id", 0), ("receiver", C), ("sender", C)],
)
def test_replay_or_misroute_fails(key: bytes, field: str, value: int) -> None:
    ct = _enc(key)
    with pytest.raises(ShareDecryptionError, match="replayed from another round/run"):
        _dec(key, ct, **{field: value})


def test_wrong_key_fails(key: bytes) -> None:
    other = bytes(b ^ 0xFF for b in key)
    with pytest.raises(ShareDecryptionError):
        _dec(other, _enc(key))


def test_truncated_ciphertext_is_invalid(key: bytes) -> None:
    with pytest.raises(InvalidMessageError, match="truncated"):
        _dec(key, _enc(key)[:20])
