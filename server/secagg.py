"""One training round with SecAgg+ over Flower messages: the server's coordinator.

Stages (each a send-and-receive over the Grid; a site that does not answer in
time, answers with an error, or sends something malformed counts as dropped at
that stage and the protocol carries on without it):

0. ``train``: sites train, record their privacy spend, and answer with two
   fresh public keys (the encoded update stays at the site);
1. ``train.secagg_share_keys``: each site gets its neighbours' keys and returns
   encrypted Shamir shares, which the server routes without being able to read;
2. ``train.secagg_masked_input``: each site gets the shares addressed to it and
   returns ``x + masks``;
3. ``train.secagg_unmask``: survivors reveal self-mask shares of survivors and
   mask-key shares of dropped sites; the server removes every mask and keeps
   only ``sum_i w_i * update_i`` and ``sum_i w_i``.

Too few sites at any stage (fewer than the threshold): the round is abandoned,
the global model stays as it was, and the log says why.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import FedConfig
from common.records import unflatten
from common.secagg import ProtocolAbort, SecAggError, ServerState
from common.secagg_wire import (MASKED_INPUT, SHARE_KEYS, UNMASK, WireError, decode_sum,
                                pack_ids, pack_key_bundle, pack_table, round_parameters,
                                unpack_shares, unpack_table)
from server.aggregate import RoundSums, message_bytes, send, site_of, triage

log = logging.getLogger("fedseal")


def _answered(replies: list[Message], sums: RoundSums, stage: str,
              names: Mapping[int, str]) -> list[Message]:
    good = []
    for reply in replies:
        if reply.has_error():
            site = names.get(reply.metadata.src_node_id, site_of(reply))
            sums.failed[site] = f"dropped at {stage}"
            log.warning("site %s dropped out at %s", site, stage)
            continue
        sums.bytes_received += message_bytes(reply.content)
        good.append(reply)
    return good


def _stage_content(server_round: int, **values: bytes) -> RecordDict:
    return RecordDict({"secagg": ConfigRecord({"round": server_round, **values})})


def secure_round(grid: Grid, nodes: list[int], content: RecordDict,
                 weights: Mapping[str, np.ndarray], cfg: FedConfig, run_id: int,
                 server_round: int) -> RoundSums:
    """Run one round's training and SecAgg+; return only the recovered sums."""
    n = len(nodes)
    k, threshold = round_parameters(cfg, n)
    length = sum(v.size for v in weights.values()) + 1  # + the weight entry
    content["secagg"] = ConfigRecord({"nodes": pack_ids(nodes), "k": k, "threshold": threshold,
                                      "round": server_round})
    sums = RoundSums()
    try:
        server = ServerState(nodes, threshold=threshold, k=k, vector_length=length,
                             run_id=run_id, round_id=server_round)
        # Stage 0: train + advertise keys.
        replies, sent = send(grid, nodes, content, "train", cfg.timeout)
        sums.bytes_sent += sent
        adverts, names = {}, {}
        for reply in triage(replies, sums):
            sums.bytes_received += message_bytes(reply.content)
            names[reply.metadata.src_node_id] = site_of(reply)
            keys = reply.content["secagg"]
            adverts[reply.metadata.src_node_id] = {"c_pk": keys["c_pk"], "s_pk": keys["s_pk"]}
        bundles = server.broadcast_keys(adverts)

        # Stage 1: share keys.
        replies, sent = send(grid, bundles, {
            i: _stage_content(server_round, bundle=pack_key_bundle(b)) for i, b in bundles.items()
        }, f"train.{SHARE_KEYS}", cfg.timeout)
        sums.bytes_sent += sent
        shares = {}
        for reply in _answered(replies, sums, "share-keys", names):
            try:
                shares[reply.metadata.src_node_id] = unpack_table(reply.content["secagg"]["shares"])
            except (WireError, KeyError) as exc:
                log.warning("site %s sent malformed shares (%s); treated as dropped",
                            site_of(reply), exc)
        routed = server.route_shares(shares)

        # Stage 2: masked input.
        replies, sent = send(grid, routed, {
            i: _stage_content(server_round, shares=pack_table(cts)) for i, cts in routed.items()
        }, f"train.{MASKED_INPUT}", cfg.timeout)
        sums.bytes_sent += sent
        for reply in _answered(replies, sums, "masked-input", names):
            node = reply.metadata.src_node_id
            try:
                server.add_masked_input(node, reply.content["masked"]["y"].numpy())
            except (SecAggError, KeyError) as exc:
                log.warning("masked input of site %s rejected (%s); treated as dropped",
                            site_of(reply), exc)
        survivors, dropped = server.unmask_request()

        # Stage 3: unmask.
        request = _stage_content(server_round, survivors=pack_ids(survivors),
                                 dropped=pack_ids(dropped))
        replies, sent = send(grid, survivors, request, f"train.{UNMASK}", cfg.timeout)
        sums.bytes_sent += sent
        unmask_replies = {}
        for reply in _answered(replies, sums, "unmask", names):
            try:
                rec = reply.content["secagg"]
                unmask_replies[reply.metadata.src_node_id] = {
                    "b_shares": unpack_shares(rec["b_shares"]),
                    "sk_shares": unpack_shares(rec["sk_shares"]),
                }
            except (WireError, KeyError) as exc:
                log.warning("site %s sent malformed unmask shares (%s); ignored", site_of(reply), exc)
        total = server.finalize(unmask_replies)
    except ProtocolAbort as exc:
        log.warning("round %d abandoned, the global model stays as it was: %s", server_round, exc)
        sums.abandoned = str(exc)
        sums.update_sum, sums.weight_sum = None, 0.0
        return sums
    flat, weight_sum = decode_sum(total, cfg, n)
    sums.update_sum = dict(unflatten(flat, weights))
    sums.weight_sum = weight_sum
    sums.contributors = [names.get(node, str(node)) for node in survivors]
    return sums
