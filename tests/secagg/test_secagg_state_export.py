"""ClientState.export_state / restore_state: round trips at every stage and rejection
of malformed, corrupted or foreign records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_round

from fedseal.common.secagg import InvalidMessageError, StageError
from fedseal.common.secagg.client import (
    STATE_FORMAT,
    STATE_VERSION,
    ClientState,
    StateFormatError,
    state_digest,
)
from fedseal.common.secagg.protocol import ClientStage

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _cycle(r, node: int) -> None:
    """Export, check the record is flat and storable, restore, and check it re-exports equal."""
    state = r.clients[node]
    data = state.export_state()
    assert data["format"] == STATE_FORMAT and data["version"] == STATE_VERSION
    assert all(type(v) in (bytes, int, str) for v in data.values())
    restored = ClientState.restore_state(dict(data), identity=r.identities[node], roster=r.roster)
    assert restored.export_state() == data
    assert restored.stage is state.stage and restored.node_id == state.node_id
    r.clients[node] = restored


def _hop(r) -> None:
    for node in list(r.clients):
        _cycle(r, node)


@pytest.mark.parametrize("n,drop", [(5, None), (10, 4)])
def test_round_exact_with_restore_between_every_stage(n: int, drop: int | None) -> None:
    r = make_round(n, k=min(8, n - 1), threshold=6 if n == 10 else 3, seed=n)
    _hop(r)
    r.advertise()
    _hop(r)
    r.share()
    _hop(r)
    dropped = r.ids[drop] if drop is not None else None
    r.mask({i: y for i, y in r.masked_replies().items() if i != dropped})
    _hop(r)
    r.sign()
    _hop(r)
    total, rejected = r.finalize()
    assert rejected == {}
    assert np.array_equal(total, r.expected([i for i in r.ids if i != dropped]))
    _hop(r)  # DONE states export and restore too
    assert all(c.stage is ClientStage.DONE for i, c in r.clients.items() if i != dropped)


def test_restored_states_keep_their_stage_guards() -> None:
    r = make_round(5, k=4, threshold=3, seed=2)
    node = r.ids[0]
    r.advertise()
    _cycle(r, node)
    with pytest.raises(StageError):
        r.clients[node].advertise_keys()
    r.share()
    _cycle(r, node)
    with pytest.raises(StageError):
        r.clients[node].share_keys(r.bundles[node])
    r.mask()
    _cycle(r, node)
    with pytest.raises(StageError):
        r.clients[node].masked_input(r.opened(node), r.vectors[node])
    r.sign()
    _cycle(r, node)
    with pytest.raises(StageError):
        r.clients[node].sign_view(r.view)
    replies = r.unmask_replies()
    _cycle(r, node)
    with pytest.raises(StageError):  # asking twice: the restored state refuses too
        r.clients[node].unmask(r.view, r.relays[node])
    assert r.finalize(replies)[1] == {}


def _record(stage: str = "masked"):
    r = make_round(5, k=4, threshold=3, seed=3)
    r.advertise()
    if stage != "advertised":
        r.share()
        r.mask()
    node = r.ids[1]
    return r, node, r.clients[node].export_state()


def _rewrite(data: dict, change) -> dict:
    doc = json.loads(data["state"])
    change(doc)
    state = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return {**data, "state": state, "digest": state_digest(state)}


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: {k: v for k, v in d.items() if k != "digest"}, "exactly the entries"),
        (lambda d: {**d, "extra": 1}, "exactly the entries"),
        (lambda d: {**d, "version": 1}, "this code reads"),
        (lambda d: {**d, "format": "other"}, "this code reads"),
        (lambda d: {**d, "state": d["state"][:-1] + b" "}, "digest does not match"),
        (lambda d: {**d, "state": "text"}, "must be bytes"),
        (lambda d: _rewrite(d, lambda doc: doc.pop("seeds")), "missing or unexpected"),
        (lambda d: _rewrite(d, lambda doc: doc.update(stage="nonsense")), "nonsense"),
        (lambda d: _rewrite(d, lambda doc: doc.update(stage="shared")), "stage 'shared' holds"),
        (lambda d: _rewrite(d, lambda doc: doc.update(k=2)), "bundle entry .* is inconsistent"),
        (lambda d: _rewrite(d, lambda doc: doc.update(t=1)), "strict majority"),
        (lambda d: _rewrite(d, lambda doc: doc.update(node="12")), "not in the round"),
        (lambda d: _rewrite(d, lambda doc: doc.update(challenge="00")), "bytes"),
        (lambda d: _rewrite(d, lambda doc: doc["own_share"].__setitem__(0, 9)), "wrong Shamir index"),
        (lambda d: _rewrite(d, lambda doc: doc["own_share"].__setitem__(1, "ab")), "bytes"),
        (lambda d: _rewrite(d, lambda doc: doc.update(seeds={})), "seeds name sites"),
        (lambda d: _rewrite(d, lambda doc: doc.update(identity="00" * 32)), "another signing key"),
    ],
)
def test_malformed_records_are_rejected(mutate, match: str) -> None:
    r, node, data = _record()
    with pytest.raises(StateFormatError, match=match):
        ClientState.restore_state(mutate(dict(data)), identity=r.identities[node], roster=r.roster)
    assert issubclass(StateFormatError, InvalidMessageError)


def test_state_from_another_site_is_rejected() -> None:
    r, node, data = _record("advertised")
    other = r.ids[2]
    with pytest.raises(StateFormatError, match="another signing key"):
        ClientState.restore_state(data, identity=r.identities[other], roster=r.roster)


def test_state_holds_no_more_secrets_than_its_stage_needs() -> None:
    r = make_round(5, k=4, threshold=3, seed=4)
    node = r.ids[0]
    r.advertise()
    r.share()
    r.mask()
    doc = json.loads(r.clients[node].export_state()["state"])
    # after masking, the private keys and the self-mask seed are gone for good
    assert doc["c_send_sk"] == doc["s_sk"] == doc["b"] == "" and doc["recv_sk"] == {}
    r.sign()
    r.unmask_replies()
    doc = json.loads(r.clients[node].export_state()["state"])
    assert doc["own_share"] is None and doc["received"] == {} and doc["seeds"] == {}
