"""One training round with SecAgg+ over Flower messages: the server's coordinator.

Stages (each a send-and-receive over the Grid):

0. ``train``: sites check the round against their own policy and their budget,
   and answer with signed public keys; nothing is trained yet;
1. ``train.secagg_share_keys``: each site gets its neighbours' signed keys and
   returns committed, encrypted Shamir shares, which the server routes;
2. ``train.secagg_masked_input``: each site gets the shares addressed to it, trains
   now, records its privacy spend, and returns ``x + masks`` (and proof against
   any neighbour whose share was bad). A round with too few sites left after
   stage 1 is abandoned before any site trains, so it costs no budget;
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
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedseal.common import egress
from fedseal.common.config import FedConfig
from fedseal.common.records import unflatten
from fedseal.common.refusals import describe
from fedseal.common.secagg import ConfigError as SecAggConfigError
from fedseal.common.secagg import ProtocolAbort, RoundContext, SecAggError, ServerState, generate_key_pair
from fedseal.common.secagg.crypto import KEY_BYTES
from fedseal.common.secagg.messages import pack_var_table
from fedseal.common.secagg_wire import (
    ADVERT,
    B_SHARES,
    BUNDLE,
    CHALLENGE,
    CIPHERTEXTS,
    COMPLAINTS,
    CONSISTENCY,
    MASKED_INPUT,
    NODES,
    RECORD,
    ROUND,
    ROUTED,
    SEEDS,
    SHARE_KEYS,
    SHARES,
    SIGNATURE,
    SIGNATURES,
    SK_SHARES,
    THRESHOLD,
    UNMASK,
    VIEW,
    K,
    SumRangeError,
    WireError,
    Y,
    decode_sum,
    pack_ids,
    pack_routed,
    quant_config,
    round_parameters,
    unpack_shares,
    unpack_table,
)
from fedseal.common.vote import round_clip
from fedseal.common.weights import weight_range
from fedseal.server.aggregate import RoundSums, error_reason, is_timed_out, message_bytes, send, triage
from fedseal.server.identity import SiteNames

log = logging.getLogger("fedseal")
T = TypeVar("T")

_MALFORMED = (WireError, SecAggError, KeyError, TypeError, ValueError, AttributeError, OSError, EOFError)


class _Round:
    """Sends one stage's messages and turns each reply into protocol input, one by one."""

    def __init__(
        self, grid: Grid, cfg: FedConfig, server_round: int, sums: RoundSums, names: SiteNames
    ) -> None:
        self.grid, self.cfg, self.server_round, self.sums = grid, cfg, server_round, sums
        self.names = names

    def name(self, node: int) -> str:
        return self.names.name(node)

    def fail(self, node: int, reason: str) -> None:
        site = self.name(node)
        self.sums.failed.setdefault(site, reason[:300])
        log.warning("site %s dropped: %s", site, reason)

    def rejected(self, rejected: Mapping[int, str]) -> None:
        for node, reason in rejected.items():
            self.fail(node, reason)

    def stage(
        self, stage: str, contents: Mapping[int, Mapping[str, bytes]], parse: Callable[[Message], T]
    ) -> dict[int, T]:
        """Send ``train.<stage>`` to each node with its values; parse each reply on its own."""
        messages = {
            node: RecordDict({RECORD: ConfigRecord({ROUND: self.server_round, **values})})
            for node, values in contents.items()
        }
        replies, sent = send(self.grid, messages, messages, f"train.{stage}", self.cfg.timeout)
        self.sums.bytes_sent += sent
        out: dict[int, T] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in contents or node in out:
                continue
            if reply.has_error():
                if is_timed_out(reply):  # the server's own reply for a silent node
                    self.fail(node, f"dropped at {stage}: {egress.REPLY_TIMEOUT}: {reply.error.reason}")
                    self.sums.timed_out.append(self.name(node))
                else:
                    self.fail(node, f"dropped at {stage}: {error_reason(reply)}")
                continue
            self.sums.bytes_received += message_bytes(reply.content)
            try:
                self.names.claim(reply)
                refused = egress.refusal_of(reply)
                if refused is not None:
                    self.fail(node, f"refused at {stage}: {describe(*refused)}")
                    continue
                out[node] = parse(reply)
            except egress.ReplyError as exc:
                self.fail(node, f"malformed reply at {stage}: {exc}")
            except _MALFORMED as exc:
                self.fail(node, f"malformed reply at {stage}: {egress.REPLY_PROTOCOL}: {exc}")
        return out


def _values(reply_type: egress.ReplyType, reply: Message, **kwargs: int) -> dict:
    parsed = egress.parse(reply_type, reply, **kwargs)
    return {k: v for record in parsed.values() for k, v in record.items()}


def _shares(reply: Message) -> tuple[bytes, dict[int, bytes]]:
    values = _values(egress.SECAGG_SHARE_KEYS, reply)
    return values[SHARES], unpack_table(values[CIPHERTEXTS])


def _masked(reply: Message, length: int) -> tuple[np.ndarray, dict[int, bytes], float, float]:
    values = _values(egress.SECAGG_MASKED_INPUT, reply, ring_length=length)
    return (values[Y], unpack_table(values[COMPLAINTS], KEY_BYTES), values["epsilon"], values["delta"])


def _unmask_reply(reply: Message) -> dict[str, dict]:
    values = _values(egress.SECAGG_UNMASK, reply)
    return {
        B_SHARES: unpack_shares(values[B_SHARES]),
        SK_SHARES: unpack_shares(values[SK_SHARES]),
        SEEDS: unpack_table(values[SEEDS], KEY_BYTES),
    }


def secure_round(
    grid: Grid,
    nodes: list[int],
    content: RecordDict,
    template: Mapping[str, np.ndarray],
    cfg: FedConfig,
    run_id: int,
    server_round: int,
    names: SiteNames | None = None,
) -> RoundSums:
    """Run one round's training and SecAgg+; return only the recovered sums.

    ``template`` names the update's arrays and shapes (:func:`fedseal.common.vote.update_template`).
    """
    n = len(nodes)
    length = sum(v.size for v in template.values()) + 1  # + the weight entry
    sums = RoundSums()
    clip = round_clip(cfg, server_round)
    try:
        quant_config(n, clip)
    except SecAggConfigError as exc:
        sums.abandoned = f"secure aggregation cannot run with {n} sites: {exc}"
        log.warning("round %d not started: %s", server_round, sums.abandoned)
        return sums
    summed = masked_sum(grid, nodes, content, length, cfg, run_id, server_round, sums, names)
    if summed is None:
        return sums
    total, survivors = summed
    try:
        flat, weight_sum = decode_sum(total, n, len(survivors), weight_range(cfg, server_round), clip)
    except SumRangeError as exc:
        abandon(sums, server_round, str(exc))
        return sums
    sums.update_sum = dict(unflatten(flat, template))
    sums.weight_sum = weight_sum
    sums.clip = clip
    return sums


def abandon(sums: RoundSums, server_round: int, reason: str) -> None:
    """Record in ``sums`` that the round is abandoned (the global model stays as it was)."""
    sums.abandoned = reason + (
        f" ({len(sums.timed_out)} site(s) timed out: raise --timeout if they are slow rather than gone)"
        if sums.timed_out
        else ""
    )
    log.warning("round %d abandoned, the global model stays as it was: %s", server_round, sums.abandoned)
    sums.update_sum, sums.weight_sum, sums.contributors = None, 0.0, []


def masked_sum(
    grid: Grid,
    nodes: list[int],
    content: RecordDict,
    length: int,
    cfg: FedConfig,
    run_id: int,
    server_round: int,
    sums: RoundSums,
    names: SiteNames | None = None,
) -> tuple[np.ndarray, list[int]] | None:
    """The SecAgg+ stages of one round: the unmasked ring sum of the survivors' vectors.

    Each site's masked vector has ``length`` uint32 entries (its reply is refused
    otherwise). Failures, refusals, spend and bytes go into ``sums``; the
    survivors become its ``contributors``.

    Returns
    -------
    tuple[numpy.ndarray, list[int]] | None
        The uint32 sum and the survivors' node ids; None if the round was
        abandoned (``sums.abandoned`` says why).
    """
    n = len(nodes)
    try:
        k, threshold = round_parameters(cfg, n)
    except SecAggConfigError as exc:
        sums.abandoned = f"secure aggregation cannot run with {n} sites: {exc}"
        log.warning("round %d not started: %s", server_round, sums.abandoned)
        return None
    challenge_sk, challenge_pk = generate_key_pair()
    ctx = RoundContext(run_id, server_round, nodes, k, threshold, challenge_pk)
    server = ServerState(ctx, challenge_private=challenge_sk, vector_length=length)
    content[RECORD] = ConfigRecord(
        {
            NODES: pack_ids(sorted(nodes)),
            K: k,
            THRESHOLD: threshold,
            ROUND: server_round,
            CHALLENGE: challenge_pk,
        }
    )
    names = names if names is not None else SiteNames()
    rnd = _Round(grid, cfg, server_round, sums, names)
    try:
        # Stage 0: train + advertise keys.
        replies, sent = send(grid, nodes, content, "train", cfg.timeout)
        sums.bytes_sent += sent
        adverts = {}
        for reply in triage(replies, sums, egress.SECAGG_ADVERT, names):
            node = reply.metadata.src_node_id
            sums.bytes_received += message_bytes(reply.content)
            try:
                adverts[node] = _values(egress.SECAGG_ADVERT, reply)[ADVERT]
            except egress.ReplyError as exc:
                rnd.fail(node, f"malformed reply at train: {exc}")
        bundles, rejected = server.collect_adverts(adverts)
        rnd.rejected(rejected)

        # Stage 1: share keys.
        shares = rnd.stage(
            SHARE_KEYS,
            {
                i: {BUNDLE: pack_var_table({j: a.encode(ctx.digest) for j, a in b.items()})}
                for i, b in bundles.items()
            },
            _shares,
        )
        routed, rejected = server.collect_shares(shares)
        rnd.rejected(rejected)

        # Stage 2: the sites train now, and send their masked input (and complaints).
        masked = rnd.stage(
            MASKED_INPUT,
            {i: {ROUTED: pack_routed(r)} for i, r in routed.items()},
            lambda r: _masked(r, length),
        )
        for node, (_, _, epsilon, delta) in masked.items():
            sums.epsilons[rnd.name(node)], sums.deltas[rnd.name(node)] = epsilon, delta
        view, rejected = server.collect_masked({n: v[:2] for n, v in masked.items()})
        rnd.rejected(rejected)

        # Stage 3: consistency check.
        signatures = rnd.stage(
            CONSISTENCY,
            {i: {VIEW: view} for i in server.survivors},
            lambda r: _values(egress.SECAGG_CONSISTENCY, r)[SIGNATURE],
        )
        relays, rejected = server.collect_signatures(signatures)
        rnd.rejected(rejected)

        # Stage 4: unmask.
        unmask = rnd.stage(
            UNMASK,
            {i: {VIEW: view, SIGNATURES: pack_var_table(sigs)} for i, sigs in relays.items()},
            _unmask_reply,
        )
        total, rejected = server.finalize(unmask)
        rnd.rejected(rejected)
    except ProtocolAbort as exc:
        abandon(sums, server_round, str(exc))
        return None
    sums.contributors = [rnd.name(node) for node in server.survivors]
    return total, list(server.survivors)
