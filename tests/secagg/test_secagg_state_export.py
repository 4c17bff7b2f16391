"""ClientState.export_state / restore_state: round trips at every stage and rejection
of malformed or corrupted records."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import (
    ClientState,
    InvalidMessageError,
    ServerState,
    StageError,
    default_k,
    default_threshold,
)
from common.secagg.client import STATE_FORMAT, STATE_VERSION, StateFormatError, _state_digest
from common.secagg.protocol import ClientStage

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Node ids above 2**63 exercise the unsigned 64-bit encoding.
IDS = [3, 2**63 + 5, 2**64 - 1, 17, 2**40 + 1]
RUN_ID, ROUND_ID = 2**64 - 2, 7


def _check_flat(data: dict[str, object]) -> None:
    assert data["format"] == STATE_FORMAT and data["version"] == STATE_VERSION
    for key, value in data.items():
        assert isinstance(key, str)
        assert type(value) in (bytes, int, str), (key, type(value))
        if type(value) is int:
            assert INT64_MIN <= value <= INT64_MAX, key


def _cycle(state: ClientState) -> ClientState:
    """Export, check the record, restore, and check the restored export is identical."""
    data = state.export_state()
    _check_flat(data)
    restored = ClientState.restore_state(dict(data))
    assert restored.export_state() == data
    assert restored.stage is state.stage
    assert restored.node_id == state.node_id and restored.participants == state.participants
    return restored


def _run_round(
    ids: list[int],
    *,
    restore: bool,
    drop_masked: frozenset[int] = frozenset(),
    length: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    n = len(ids)
    k = default_k(n)
    t = default_threshold(min(k, n - 1))
    rng = np.random.default_rng(1)
    vectors = {i: rng.integers(0, 2**32, size=length, dtype=np.uint32) for i in ids}
    server = ServerState(ids, threshold=t, k=k, vector_length=length, run_id=RUN_ID,
                         round_id=ROUND_ID)
    clients = {i: ClientState(i, ids, threshold=t, k=k, run_id=RUN_ID, round_id=ROUND_ID)
               for i in ids}

    def hop() -> None:
        if restore:
            for i in clients:
                clients[i] = _cycle(clients[i])

    hop()
    adverts = {i: c.advertise_keys() for i, c in clients.items()}
    hop()
    bundles = server.broadcast_keys(adverts)
    shares = {i: clients[i].share_keys(b) for i, b in bundles.items()}
    hop()
    routed = server.route_shares(shares)
    for i, cts in routed.items():
        y = clients[i].masked_input(cts, vectors[i])
        if i not in drop_masked:
            server.add_masked_input(i, y)
    hop()
    survivors, dropped = server.unmask_request()
    assert sorted(dropped) == sorted(drop_masked)
    replies = {i: clients[i].unmask(survivors, dropped) for i in survivors}
    hop()
    expected = np.zeros(length, dtype=np.uint32)
    for i in survivors:
        expected += vectors[i]
    return server.finalize(replies), expected


def test_round_exact_with_restore_between_every_stage():
    total, expected = _run_round(IDS, restore=True)
    np.testing.assert_array_equal(total, expected)


def test_round_exact_with_restore_and_dropout():
    ids = sorted(IDS + [101, 102, 103, 104, 105])  # n=10, k=8: SecAgg+ with a dropout
    total, expected = _run_round(ids, restore=True, drop_masked=frozenset({ids[4]}))
    np.testing.assert_array_equal(total, expected)


def test_restored_states_keep_their_stage_guards():
    ids = IDS
    server = ServerState(ids, threshold=3, k=4, vector_length=4, run_id=1, round_id=1)
    clients = {i: ClientState(i, ids, threshold=3, k=4, run_id=1, round_id=1) for i in ids}
    bundles = server.broadcast_keys({i: c.advertise_keys() for i, c in clients.items()})
    node = ids[0]
    with pytest.raises(StageError):
        _cycle(clients[node]).advertise_keys()
    routed = server.route_shares({i: clients[i].share_keys(b) for i, b in bundles.items()})
    with pytest.raises(StageError):
        _cycle(clients[node]).share_keys(bundles[node])
    for i in ids:
        server.add_masked_input(i, clients[i].masked_input(routed[i], np.ones(4, np.uint32)))
    with pytest.raises(StageError):
        _cycle(clients[node]).masked_input(routed[node], np.ones(4, np.uint32))
    survivors, dropped = server.unmask_request()
    replies = {i: _cycle(clients[i]).unmask(survivors, dropped) for i in survivors}
    assert np.array_equal(server.finalize(replies), np.full(4, len(ids), np.uint32))
    clients[node].unmask(survivors, dropped)
    done = _cycle(clients[node])
    assert done.stage is ClientStage.DONE
    with pytest.raises(StageError):
        done.unmask(survivors, dropped)


def test_fields_and_encodings():
    c = ClientState(IDS[1], IDS, threshold=3, k=4, run_id=RUN_ID, round_id=ROUND_ID)
    data = c.export_state()
    assert data["node_id"] == IDS[1].to_bytes(8, "big")
    assert data["run_id"] == RUN_ID.to_bytes(8, "big")
    assert data["round_id"] == ROUND_ID.to_bytes(8, "big")
    assert data["participants"] == b"".join(i.to_bytes(8, "big") for i in sorted(IDS))
    assert len(data["neighbours"]) == 8 * 4
    assert data["stage"] == "init" and data["threshold"] == 3 and data["k"] == 4
    assert all(data[key] == b"" for key in ("c_sk", "c_pk", "s_sk", "s_pk", "b"))


def test_flower_config_record_roundtrip():
    flwr_app = pytest.importorskip("flwr.app")
    c = ClientState(IDS[2], IDS, threshold=3, k=4, run_id=RUN_ID, round_id=ROUND_ID)
    c.advertise_keys()
    record = flwr_app.ConfigRecord(c.export_state())
    restored = ClientState.restore_state(dict(record.items()))
    assert restored.export_state() == c.export_state()


# ----------------------------------------------------------------- corruption
def _masked_state_record() -> dict[str, object]:
    """Record of a client in stage MASKED (every kind of entry is populated)."""
    ids = IDS
    server = ServerState(ids, threshold=3, k=4, vector_length=4, run_id=1, round_id=1)
    clients = {i: ClientState(i, ids, threshold=3, k=4, run_id=1, round_id=1) for i in ids}
    bundles = server.broadcast_keys({i: c.advertise_keys() for i, c in clients.items()})
    routed = server.route_shares({i: clients[i].share_keys(b) for i, b in bundles.items()})
    node = ids[0]
    clients[node].masked_input(routed[node], np.zeros(4, dtype=np.uint32))
    data = clients[node].export_state()
    assert data["received"] and data["peer_keys"] and data["own_share"]
    return dict(data)


def _redigest(data: dict[str, object]) -> dict[str, object]:
    data["digest"] = _state_digest(data)
    return data


def _reject(data: object, match: str) -> None:
    with pytest.raises(StateFormatError, match=match) as info:
        ClientState.restore_state(data)  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidMessageError)


def test_restore_accepts_bytearray():
    data = _masked_state_record()
    data["received"] = bytearray(data["received"])  # type: ignore[arg-type]
    ClientState.restore_state(data)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("stage", 3, "must be str"),
        ("threshold", "3", "must be int"),
        ("threshold", True, "must be int"),
        ("k", -1, "outside"),
        ("node_id", 5, "must be bytes"),
        ("node_id", b"\x00" * 7, "must be 8 bytes"),
        ("participants", b"\x00" * 9, "multiple of 8"),
        ("c_sk", b"\x01" * 31, "32 bytes or empty"),
        ("own_share", b"\x00" * 65, "66 bytes or empty"),
        ("received", b"\x00" * 73, "multiple of 74"),
        ("peer_keys", b"\x00" * 71, "multiple of 72"),
        ("digest", b"", "digest"),
        ("version", STATE_VERSION + 1, "version"),
        ("format", "something-else", "format"),
        ("stage", "finished", "unknown stage"),
    ],
)
def test_bad_type_or_length_rejected(key, value, match):
    data = _masked_state_record()
    data[key] = value
    _reject(data, match)


def test_missing_and_extra_entries_rejected():
    data = _masked_state_record()
    del data["b"]
    _reject(data, "missing entries")
    data = _masked_state_record()
    data["extra"] = 1
    _reject(data, "unexpected entries")
    _reject([("stage", "init")], "expected a mapping")


def test_bit_flip_detected_by_digest():
    data = _masked_state_record()
    for key in ("received", "own_share", "s_pk", "participants"):
        corrupted = dict(data)
        raw = bytearray(corrupted[key])  # type: ignore[arg-type]
        raw[len(raw) // 2] ^= 0x01
        corrupted[key] = bytes(raw)
        _reject(corrupted, "digest does not match")
    corrupted = dict(data)
    corrupted["threshold"] = int(data["threshold"]) + 1  # type: ignore[arg-type]
    _reject(corrupted, "digest does not match")


def test_inconsistent_content_rejected_even_with_valid_digest():
    base = _masked_state_record()
    data = dict(base)
    data["stage"] = "shared"  # secrets were erased after masking
    _reject(_redigest(data), "must be set in stage 'shared'")
    data = dict(base)
    data["threshold"] = 1  # violates 2t > k + 1
    _reject(_redigest(data), "round parameters are invalid")
    data = dict(base)
    # Sorted and well-formed, but node 4 is not a neighbour in the round's graph.
    data["neighbours"] = (4).to_bytes(8, "big") + bytes(data["neighbours"])[8:]
    _reject(_redigest(data), "differ from the round's neighbour graph")
    data = dict(base)
    data["received"] = bytes(data["received"]) * 2  # same sender twice
    _reject(_redigest(data), "not a distinct neighbour")
    data = dict(base)
    rec = bytearray(data["own_share"])  # type: ignore[arg-type]
    rec[0:2] = (0).to_bytes(2, "big")
    data["own_share"] = bytes(rec)
    _reject(_redigest(data), "Shamir index 0")
    data = dict(base)
    data["participants"] = bytes(reversed(bytes(data["participants"])))
    _reject(_redigest(data), "not sorted")


def test_mismatched_key_pair_rejected():
    c = ClientState(IDS[0], IDS, threshold=3, k=4, run_id=1, round_id=1)
    c.advertise_keys()
    data = dict(c.export_state())
    data["c_pk"] = data["s_pk"]
    _reject(_redigest(data), "'c_pk' does not belong to 'c_sk'")


def test_secrets_missing_for_stage_rejected():
    c = ClientState(IDS[0], IDS, threshold=3, k=4, run_id=1, round_id=1)
    data = dict(c.export_state())
    data["stage"] = "done"
    _reject(_redigest(data), "must be set in stage 'done'")
