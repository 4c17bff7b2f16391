"""The site's side of SecAgg+: check it belongs in the round, keep the protocol state in the
node's ``Context.state`` between messages, and answer each stage.

The site's signing key (``identity-key``) and roster (``peers``) come from its
own settings, never from the server. :func:`check_round` runs before anything
else. Stage 0 (advertise keys) rides on the ``train`` reply, before any
training; stage 1 shares keys; the site trains only at stage 2, when the server
asks for its masked input (the cohort has then shown it can complete the
round), and only after the shares routed to it open and check
(:func:`open_routed`), and sends ``x + masks`` with the committed spend; then it signs the
survivor view and helps unmask. Nothing here ever sends the update itself:
only ``x + masks`` leaves the site.

At most one unmask per (job, round): before it answers, the site records the
pair durably (a small file beside its ledger, or ``Context.state`` without
one), and refuses any later unmask request for the same pair, so two
aggregates over different survivor sets can never be subtracted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedseal.client import cache, once
from fedseal.client.site import SiteSettings
from fedseal.common import egress
from fedseal.common.config import FedConfig
from fedseal.common.refusals import Code, Refusal
from fedseal.common.secagg import ClientState, Identity, Roster, RoundContext, SecAggError, UnmaskRefusedError
from fedseal.common.secagg.client import OpenedShares, state_digest
from fedseal.common.secagg.messages import Advert, ShareMessage
from fedseal.common.secagg_wire import (
    ADVERT,
    B_SHARES,
    BUNDLE,
    CHALLENGE,
    CIPHERTEXTS,
    NODES,
    RECORD,
    ROUND,
    ROUTED,
    SEEDS,
    SHARES,
    SIGNATURE,
    SIGNATURES,
    SK_SHARES,
    THRESHOLD,
    VIEW,
    K,
    WireError,
    encode_update,
    field,
    pack_shares,
    pack_table,
    quant_config,
    unpack_ids,
    unpack_routed,
    var_table,
)
from fedseal.common.vote import round_clip

log = logging.getLogger(__name__)

STATE = "fedseal.secagg.state"  # the protocol state (this site's secrets)
SITE = "fedseal.secagg.site"  # the site's own paths and policy for this round
UNMASKED = "fedseal.secagg.unmasked"  # the once-per-round record of unmasked (job, round) pairs
UNMASKED_SUFFIX = ".secagg-unmasked.json"  # its file, beside the ledger


def unmask_record_path(ledger_path: Path) -> Path:
    """The durable record of unmasked rounds, beside the site's ledger."""
    return once.record_path(ledger_path, UNMASKED_SUFFIX)


def _round_context(content: RecordDict, context: Context) -> RoundContext:
    params = content[RECORD] if RECORD in content.config_records else None
    if params is None:
        raise Refusal(
            Code.MESSAGE_SECAGG,
            "the server sent no secure-aggregation parameters with secure "
            "aggregation on; this site will not train",
        )
    try:
        nodes = unpack_ids(field(params, NODES, bytes))
        return RoundContext(
            context.run_id,
            field(params, ROUND, int),
            nodes,
            field(params, K, int),
            field(params, THRESHOLD, int),
            field(params, CHALLENGE, bytes),
        )
    except (WireError, SecAggError) as exc:
        raise Refusal(
            Code.MESSAGE_SECAGG, f"the server's secure-aggregation parameters are invalid ({exc})"
        ) from None


def check_encoding(cfg: FedConfig, ctx: RoundContext) -> None:
    """Before any training: the plain update's fixed-point grid fits the cohort the server sent.

    The grid leaves headroom for the sum of every listed site, so a node list padded with
    invented ids can leave no grid at all; found only when the update is encoded, that
    would be after the round's spend is committed.

    Raises
    ------
    fedseal.common.refusals.Refusal
        If no grid fits (public values only).
    """
    n = len(ctx.participants)
    try:
        quant_config(n, round_clip(cfg, ctx.round_id))
    except SecAggError as exc:
        raise Refusal(
            Code.MESSAGE_SECAGG,
            f"the round's cohort of {n} sites leaves no fixed-point grid for the update ({exc})",
        ) from None


def _read(path: Path | None, what: str, flag: str) -> bytes:
    if path is None:
        raise Refusal(
            Code.SITE_KEYS,
            f"secure aggregation needs this site's {what} ({flag}); a site without "
            "it cannot tell real fellow sites from ones a server invents",
        )
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise Refusal(
            Code.SITE_KEYS, f"cannot read this site's {what} {path} ({exc.strerror}); fix {flag}"
        ) from None


def load_identity(path: Path | None) -> Identity:
    """The site's signing key from its ``identity-key`` file."""
    return cache.parsed(_read(path, "signing key", "identity-key"), Identity.from_private_bytes)


def load_roster(path: Path | None) -> Roster:
    """The roster of accepted sites from the site's ``peers`` file."""
    try:
        return cache.parsed(
            _read(path, "roster of accepted sites", "peers"),
            lambda data: Roster.from_text(data.decode("utf-8")),
        )
    except UnicodeDecodeError:
        raise Refusal(Code.SITE_KEYS, f"the peers file {path} is not text (OpenSSH .pub lines)") from None


def check_round(content: RecordDict, context: Context, site: SiteSettings, server_round: int) -> RoundContext:
    """Before any training: the round's parameters parse, name the training message's round
    ``server_round`` (which decides the update's form and bound), this site is in its
    cohort, and the site's signing key and roster can be read.

    The cohort size, ``k``, ``t`` and the update clip are held against the
    site's policy by :func:`fedseal.client.policy.check_train`, which runs first.

    Raises
    ------
    fedseal.common.refusals.Refusal
        Saying what is wrong (in its detail) and why (its code).
    """
    ctx = _round_context(content, context)
    if ctx.round_id != server_round:
        raise Refusal(
            Code.MESSAGE_SECAGG,
            f"the secure-aggregation parameters are for round {ctx.round_id}, the "
            f"training message for round {server_round}",
        )
    if context.node_id not in ctx.participants:
        raise Refusal(Code.MESSAGE_SECAGG, "this site is not in the round's cohort the server sent")
    load_identity(site.identity_key)
    load_roster(site.peers)
    return ctx


def _site(context: Context) -> ConfigRecord:
    if SITE not in context.state:
        raise ValueError(
            "no secure-aggregation round in progress at this site "
            "(it restarted, or the stage arrived out of order)"
        )
    return context.state.config_records[SITE]


def _load(context: Context) -> ClientState:
    """The protocol state the last stage saved: the live object this process kept for exactly
    that record, else rebuilt (and fully checked) from the record."""
    info = _site(context)
    if STATE not in context.state:
        raise ValueError(
            "no secure-aggregation round in progress at this site "
            "(it restarted, or the stage arrived out of order)"
        )
    data = dict(context.state[STATE].items())
    identity = load_identity(Path(str(info["identity-key"])))
    roster = load_roster(Path(str(info["peers"])))
    live = cache.take(_live_key(context, data))
    if isinstance(live, ClientState) and live.identity is identity and live.roster is roster:
        return live
    return ClientState.restore_state(data, identity=identity, roster=roster)


def _save(context: Context, state: ClientState) -> None:
    data = state.export_state()
    context.state[STATE] = ConfigRecord(data)
    cache.keep(_live_key(context, data), state)


def _live_key(context: Context, data: dict) -> tuple:
    """Names a saved state by its node and the digest of its record (which holds its secrets)."""
    record = data.get("state")
    digest = state_digest(bytes(record)) if isinstance(record, (bytes, bytearray)) else b""
    return (STATE, context.node_id, digest)


def _clear(context: Context) -> None:
    for key in (STATE, SITE):
        if key in context.state:
            del context.state[key]


def _params(msg: Message, state: ClientState) -> ConfigRecord:
    if RECORD not in msg.content.config_records:
        raise WireError(f"the message carries no '{RECORD}' record")
    params = msg.content[RECORD]
    if not isinstance(params, ConfigRecord):
        raise WireError(f"the message's '{RECORD}' record is not a config record")
    rnd = field(params, ROUND, int)
    if rnd != state.ctx.round_id:
        raise ValueError(
            f"secure-aggregation message for round {rnd}, but this site is in "
            f"round {state.ctx.round_id}; the message is stale and is refused"
        )
    return params


def _reply(reply_type: egress.ReplyType, msg: Message, **values: bytes) -> Message:
    return egress.build(reply_type, msg, {RECORD: values})


def begin_round(
    msg: Message, context: Context, site: SiteSettings, job: str, server_round: int
) -> dict[str, bytes]:
    """Start this round's protocol state (round ``server_round`` of ``job``); return the signed keys.

    Nothing is trained or encoded yet: the site trains only when the server asks
    for its masked input, after the cohort has shared its keys.
    """
    _clear(context)
    ctx = check_round(msg.content, context, site, server_round)
    identity, roster = load_identity(site.identity_key), load_roster(site.peers)
    state = ClientState(
        context.node_id, ctx, identity=identity, roster=roster, min_survivors=site.policy.min_cohort
    )
    advert = state.advertise_keys()
    context.state[SITE] = ConfigRecord(
        {
            "job": job,
            "identity-key": str(site.identity_key),
            "peers": str(site.peers),
            "record": str(unmask_record_path(site.ledger_path)) if site.ledger_path else "",
        }
    )
    _save(context, state)
    return {ADVERT: advert.encode(ctx.digest)}


def round_of(context: Context) -> tuple[str, int]:
    """The job and round of the secure round in progress at this site."""
    info, state = _site(context), _load(context)
    return str(info["job"]), state.ctx.round_id


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 1: check the neighbours' signed keys; deal, commit to and encrypt shares."""
    state = _load(context)
    table = var_table(field(_params(msg, state), BUNDLE, bytes), "key bundle")
    bundle: dict[int, Advert] = {}
    for node, data in table.items():
        bundle[node], _ = Advert.decode(data)
    message, ciphertexts = state.share_keys(bundle)
    _save(context, state)
    return _reply(
        egress.SECAGG_SHARE_KEYS,
        msg,
        **{SHARES: message.encode(state.ctx.digest), CIPHERTEXTS: pack_table(ciphertexts)},
    )


@dataclass(frozen=True)
class Routed:
    """The shares the server routed to this site for stage 2, opened and checked."""

    state: ClientState
    opened: OpenedShares


def open_routed(msg: Message, context: Context) -> Routed:
    """Stage 2's check, before the site trains or commits any spend: parse, decrypt and check
    the routed shares, so that a server which routes malformed or forged ones costs the site
    nothing (the refusal leaves the budget as it was)."""
    state = _load(context)
    routed = unpack_routed(field(_params(msg, state), ROUTED, bytes))
    opened = {s: (ShareMessage.decode(m)[0], ct) for s, (m, ct) in routed.items()}
    return Routed(state, state.open_shares(opened))


def masked_input(
    context: Context, routed: Routed, cfg: FedConfig, flat_weighted_update: np.ndarray, weight: float
) -> tuple[np.ndarray, bytes]:
    """Stage 2: encode the committed update and return ``x + masks`` and the complaints.

    ``x`` exists only inside this call: what leaves is the masked vector.
    """
    x = encode_update(
        flat_weighted_update,
        weight,
        len(routed.state.ctx.participants),
        round_clip(cfg, routed.state.ctx.round_id),
    )
    return masked_vector(context, routed, x)


def masked_vector(context: Context, routed: Routed, x: np.ndarray) -> tuple[np.ndarray, bytes]:
    """Stage 2 for a vector already in the ring (uint32): ``x + masks`` and the complaints.

    :func:`masked_input` encodes a plain update and calls this; under distributed
    noise ``x`` is the site's encoded noisy share (:mod:`fedseal.client.ddp_round`).
    """
    y, complaints = routed.state.mask(routed.opened, x)
    _save(context, routed.state)
    return y, pack_table(complaints)


def cohort_size(context: Context) -> int:
    """Sites in the secure round in progress at this site (the server's node list)."""
    return len(_load(context).ctx.participants)


def consistency(msg: Message, context: Context) -> Message:
    """Stage 3: check the server's survivor view against what this site saw, and sign it."""
    state = _load(context)
    signature = state.sign_view(field(_params(msg, state), VIEW, bytes))
    _save(context, state)
    return _reply(egress.SECAGG_CONSISTENCY, msg, **{SIGNATURE: signature})


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: reveal the shares the view needs, once per (job, round), recorded first."""
    state = _load(context)
    info = _site(context)
    params = _params(msg, state)
    signatures = var_table(field(params, SIGNATURES, bytes), "view signatures")
    reply = state.unmask(field(params, VIEW, bytes), signatures)
    key = (str(info["job"]), state.ctx.round_id)
    path = Path(str(info["record"])) if str(info["record"]) else None
    try:
        done = once.done(context, UNMASKED, path)
    except once.OnceError as exc:
        raise UnmaskRefusedError(f"{exc}; it will not unmask anything until then") from None
    if key in done:
        _clear(context)
        raise UnmaskRefusedError(
            f"this site already helped unmask round {key[1]} of job {key[0]}; a second unmask "
            "could let the server subtract two sums and learn one site's update, so it refuses"
        )
    try:
        once.remember(context, UNMASKED, path, done | {key})
    except once.OnceError as exc:
        _clear(context)
        raise UnmaskRefusedError(f"{exc}; it reveals nothing it could not record") from None
    _clear(context)
    return _reply(
        egress.SECAGG_UNMASK,
        msg,
        **{
            B_SHARES: pack_shares(reply[B_SHARES]),
            SK_SHARES: pack_shares(reply[SK_SHARES]),
            SEEDS: pack_table(reply[SEEDS]),
        },
    )


__all__ = [
    "begin_round",
    "check_encoding",
    "check_round",
    "cohort_size",
    "consistency",
    "load_identity",
    "load_roster",
    "Routed",
    "masked_input",
    "masked_vector",
    "open_routed",
    "share_keys",
    "unmask",
    "unmask_record_path",
]
