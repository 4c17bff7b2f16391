"""The site's side of SecAgg+: keep the encoded update and secrets in the node's
``Context.state`` between messages, and answer each stage.

Stage 0 (advertise keys) rides on the ``train`` reply; then ``train.<stage>``
messages carry the key bundle, the routed shares, and the unmask request.
Nothing here ever sends the update itself: only ``x + masks`` leaves the site.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.config import FedConfig
from common.secagg import ClientState
from common.secagg_wire import (encode_update, pack_shares, pack_table, unpack_ids,
                                unpack_key_bundle, unpack_table)

log = logging.getLogger(__name__)

STATE = "fedseal.secagg.state"
INPUT = "fedseal.secagg.input"


def _check_round(msg: Message, state: ClientState) -> None:
    rnd = int(msg.content["secagg"]["round"])
    if rnd != state.round_id:
        raise ValueError(f"secure-aggregation message for round {rnd}, but this site is in "
                         f"round {state.round_id}; the message is stale and is refused")


def _load(context: Context) -> ClientState:
    if STATE not in context.state:
        raise ValueError("no secure-aggregation round in progress at this site "
                         "(it restarted, or the stage arrived out of order)")
    return ClientState.restore_state(dict(context.state[STATE].items()))


def _save(context: Context, state: ClientState) -> None:
    context.state[STATE] = ConfigRecord(state.export_state())


def _clear(context: Context) -> None:
    for key in (STATE, INPUT):
        if key in context.state:
            del context.state[key]


def begin_round(msg: Message, context: Context, cfg: FedConfig,
                flat_weighted_update: np.ndarray, weight: float) -> ConfigRecord:
    """Encode the update, start this round's protocol state, and return the public keys."""
    _clear(context)
    params = msg.content["secagg"]
    nodes = unpack_ids(params["nodes"])
    server_round = int(params["round"])
    x = encode_update(flat_weighted_update, weight, cfg, len(nodes))
    state = ClientState(context.node_id, nodes, threshold=int(params["threshold"]),
                        k=int(params["k"]), run_id=context.run_id, round_id=server_round)
    keys = state.advertise_keys()
    context.state[INPUT] = ArrayRecord({"x": Array(x)})
    _save(context, state)
    return ConfigRecord({"c_pk": keys["c_pk"], "s_pk": keys["s_pk"]})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir-share the self-mask seed and mask key, encrypted per neighbour."""
    state = _load(context)
    _check_round(msg, state)
    ciphertexts = state.share_keys(unpack_key_bundle(msg.content["secagg"]["bundle"]))
    _save(context, state)
    return Message(RecordDict({"secagg": ConfigRecord({"shares": pack_table(ciphertexts)})}),
                   reply_to=msg)


def masked_input(msg: Message, context: Context) -> Message:
    """Stage 2: send ``x + masks``; the plain ``x`` is deleted afterwards."""
    state = _load(context)
    _check_round(msg, state)
    x = context.state[INPUT]["x"].numpy()
    y = state.masked_input(unpack_table(msg.content["secagg"]["shares"]), x)
    del context.state[INPUT]
    _save(context, state)
    return Message(RecordDict({"masked": ArrayRecord({"y": Array(y)})}), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 3: reveal seed shares of survivors and key shares of dropped sites."""
    state = _load(context)
    _check_round(msg, state)
    params = msg.content["secagg"]
    reply = state.unmask(unpack_ids(params["survivors"]), unpack_ids(params["dropped"]))
    _clear(context)
    return Message(RecordDict({"secagg": ConfigRecord({
        "b_shares": pack_shares(reply["b_shares"]),
        "sk_shares": pack_shares(reply["sk_shares"]),
    })}), reply_to=msg)
