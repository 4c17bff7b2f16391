"""One training round with SecAgg+ over Flower messages: the server's coordinator.

Stages (each a send-and-receive over the Grid):

0. ``train``: sites check the round against their own policy, train, record
   their privacy spend, and answer with signed public keys (the encoded update
   stays at the site);
1. ``train.secagg_share_keys``: each site gets its neighbours' signed keys and
   returns committed, encrypted Shamir shares, which the server routes;
2. ``train.secagg_masked_input``: each site gets the shares addressed to it and
   returns ``x + masks`` (and proof against any neighbour whose share was bad);
3. ``train.secagg_consistency``: each survivor gets the survivor view and signs
   it if it matches what the site saw;
4. ``train.secagg_unmask``: the signers get the view and the signatures they
   need, and reveal self-mask shares of survivors and mask-key shares and mask
   seeds of dropped sites; the server removes every mask and keeps only
   ``sum_i w_i * update_i`` and ``sum_i w_i``.

Every reply is checked on its own at every stage: a site that does not answer
in time, answers with an error, or sends anything malformed or dishonest is
dropped and named in the round's ``failed`` entry with the reason, and the round
goes on with the rest. With too few sites left at any stage, or a sum no honest
sites can have produced, the round is abandoned: the global model stays as it
was and ``abandoned`` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedseal.common.config import FedConfig
from fedseal.common.records import unflatten
from fedseal.common.secagg import ProtocolAbort, RoundContext, SecAggError, ServerState, generate_key_pair
from fedseal.common.secagg import ConfigError as SecAggConfigError
from fedseal.common.secagg.crypto import KEY_BYTES
from fedseal.common.secagg.messages import pack_var_table
from fedseal.common.secagg_wire import (ADVERT, B_SHARES, BUNDLE, CHALLENGE, CIPHERTEXTS, COMPLAINTS,
                                CONSISTENCY, K, MASKED, MASKED_INPUT, NODES, RECORD, ROUND,
                                ROUTED, SEEDS, SHARE_KEYS, SHARES, SIGNATURE, SIGNATURES,
                                SK_SHARES, THRESHOLD, UNMASK, VIEW, Y, SumRangeError, WireError,
                                decode_sum, field, pack_ids, pack_routed, quant_config,
                                round_parameters, unpack_shares, unpack_table)
from fedseal.common.vote import round_clip
from fedseal.common.weights import weight_range
from fedseal.server.aggregate import RoundSums, is_timed_out, message_bytes, send, site_of, triage

log = logging.getLogger("fedseal")

_MALFORMED = (WireError, SecAggError, KeyError, TypeError, ValueError, AttributeError, OSError,
              EOFError)


class _Round:
    """Sends one stage's messages and turns each reply into protocol input, one by one."""

    def __init__(self, grid: Grid, cfg: FedConfig, server_round: int, sums: RoundSums) -> None:
        self.grid, self.cfg, self.server_round, self.sums = grid, cfg, server_round, sums
        self.names: dict[int, str] = {}

    def name(self, node: int) -> str:
        return self.names.get(node, str(node))

    def fail(self, node: int, reason: str) -> None:
        site = self.name(node)
        self.sums.failed.setdefault(site, reason[:300])
        log.warning("site %s dropped: %s", site, reason)

    def rejected(self, rejected: Mapping[int, str]) -> None:
        for node, reason in rejected.items():
            self.fail(node, reason)

    def stage(self, stage: str, contents: Mapping[int, Mapping[str, bytes]],
              parse: Callable[[Message], object]) -> dict[int, object]:
        """Send ``train.<stage>`` to each node with its values; parse each reply on its own."""
        messages = {node: RecordDict({RECORD: ConfigRecord({ROUND: self.server_round, **values})})
                    for node, values in contents.items()}
        replies, sent = send(self.grid, messages, messages, f"train.{stage}", self.cfg.timeout)
        self.sums.bytes_sent += sent
        out: dict[int, object] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in contents or node in out:
                continue
            if reply.has_error():
                reason = reply.error.reason.splitlines()[-1] if reply.error.reason else "error"
                self.fail(node, f"dropped at {stage}: {reason}")
                if is_timed_out(reply):
                    self.sums.timed_out.append(self.name(node))
                continue
            self.sums.bytes_received += message_bytes(reply.content)
            try:
                out[node] = parse(reply)
            except _MALFORMED as exc:
                self.fail(node, f"malformed reply at {stage}: {exc}")
        return out


def _record(reply: Message) -> ConfigRecord:
    if RECORD not in reply.content.config_records:
        raise WireError(f"the reply has no '{RECORD}' config record")
    return reply.content[RECORD]


def _masked(reply: Message, length: int) -> tuple[np.ndarray, dict[int, bytes]]:
    if MASKED not in reply.content.array_records:
        raise WireError(f"the reply has no '{MASKED}' array record")
    array = reply.content[MASKED][Y] if Y in reply.content[MASKED] else None
    if array is None or array.dtype != "uint32" or tuple(array.shape) != (length,):
        raise WireError(f"the masked vector must be uint32 of shape ({length},)")
    y = array.numpy()
    complaints = unpack_table(field(_record(reply), COMPLAINTS, bytes), KEY_BYTES)
    return y, complaints


def _unmask_reply(reply: Message) -> dict[str, dict]:
    rec = _record(reply)
    return {B_SHARES: unpack_shares(field(rec, B_SHARES, bytes)),
            SK_SHARES: unpack_shares(field(rec, SK_SHARES, bytes)),
            SEEDS: unpack_table(field(rec, SEEDS, bytes), KEY_BYTES)}


def secure_round(grid: Grid, nodes: list[int], content: RecordDict,
                 template: Mapping[str, np.ndarray], cfg: FedConfig, run_id: int,
                 server_round: int) -> RoundSums:
    """Run one round's training and SecAgg+; return only the recovered sums.

    ``template`` names the update's arrays and shapes (:func:`fedseal.common.vote.update_template`).
    """
    n = len(nodes)
    length = sum(v.size for v in template.values()) + 1  # + the weight entry
    sums = RoundSums()
    try:
        k, threshold = round_parameters(cfg, n)
        clip = round_clip(cfg, server_round)
        quant_config(n, clip)
    except SecAggConfigError as exc:
        sums.abandoned = f"secure aggregation cannot run with {n} sites: {exc}"
        log.warning("round %d not started: %s", server_round, sums.abandoned)
        return sums
    challenge_sk, challenge_pk = generate_key_pair()
    ctx = RoundContext(run_id, server_round, nodes, k, threshold, challenge_pk)
    server = ServerState(ctx, challenge_private=challenge_sk, vector_length=length)
    content[RECORD] = ConfigRecord({NODES: pack_ids(sorted(nodes)), K: k, THRESHOLD: threshold,
                                    ROUND: server_round, CHALLENGE: challenge_pk})
    rnd = _Round(grid, cfg, server_round, sums)
    try:
        # Stage 0: train + advertise keys.
        replies, sent = send(grid, nodes, content, "train", cfg.timeout)
        sums.bytes_sent += sent
        adverts = {}
        for reply in triage(replies, sums):
            node = reply.metadata.src_node_id
            name = site_of(reply)  # what the site calls itself; two may not share a name
            rnd.names[node] = name if name not in rnd.names.values() else f"{name} (node {node})"
            sums.bytes_received += message_bytes(reply.content)
            try:
                adverts[node] = field(_record(reply), ADVERT, bytes)
            except WireError as exc:
                sums.drop_spend(rnd.name(node))
                rnd.fail(node, f"malformed reply at train: {exc}")
        bundles, rejected = server.collect_adverts(adverts)
        rnd.rejected(rejected)

        # Stage 1: share keys.
        shares = rnd.stage(SHARE_KEYS, {
            i: {BUNDLE: pack_var_table({j: a.encode(ctx.digest) for j, a in b.items()})}
            for i, b in bundles.items()
        }, lambda r: (field(_record(r), SHARES, bytes),
                      unpack_table(field(_record(r), CIPHERTEXTS, bytes))))
        routed, rejected = server.collect_shares(shares)
        rnd.rejected(rejected)

        # Stage 2: masked input (and complaints).
        masked = rnd.stage(MASKED_INPUT, {i: {ROUTED: pack_routed(r)} for i, r in routed.items()},
                           lambda r: _masked(r, length))
        view, rejected = server.collect_masked(masked)
        rnd.rejected(rejected)

        # Stage 3: consistency check.
        signatures = rnd.stage(CONSISTENCY, {i: {VIEW: view} for i in server.survivors},
                               lambda r: field(_record(r), SIGNATURE, bytes))
        relays, rejected = server.collect_signatures(signatures)
        rnd.rejected(rejected)

        # Stage 4: unmask.
        unmask = rnd.stage(UNMASK, {i: {VIEW: view, SIGNATURES: pack_var_table(sigs)}
                                    for i, sigs in relays.items()}, _unmask_reply)
        total, rejected = server.finalize(unmask)
        rnd.rejected(rejected)
        flat, weight_sum = decode_sum(total, n, len(server.survivors),
                                      weight_range(cfg, server_round), clip)
    except (ProtocolAbort, SumRangeError) as exc:
        sums.abandoned = str(exc) + (f" ({len(sums.timed_out)} site(s) timed out: raise --timeout "
                                     "if they are slow rather than gone)" if sums.timed_out else "")
        log.warning("round %d abandoned, the global model stays as it was: %s", server_round,
                    sums.abandoned)
        sums.update_sum, sums.weight_sum = None, 0.0
        return sums
    sums.update_sum = dict(unflatten(flat, template))
    sums.weight_sum = weight_sum
    sums.clip = clip
    sums.contributors = [rnd.name(node) for node in server.survivors]
    return sums
