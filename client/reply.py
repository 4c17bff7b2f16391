"""What a site answers: replies built from committed spend, and refusals that carry no data.

Every reply leaves through :func:`fedseal.common.egress.build` and one of its
declared types; this module chooses the type and fills it from public values
and the committed round.

A train reply can only be built from a :class:`~fedseal.client.spend.CommittedRound`,
which only :func:`fedseal.client.spend.commit_round` makes, after the round's spend is
in the ledger: "spend recorded before anything leaves" is a matter of types,
not of statement order. Every number the reply carries about privacy (epsilon,
delta, steps, noise multiplier, sampling rate) and the weight are read from
that one object, and the update, the job and the round must be the ones it was
committed for.

:func:`answered` wraps each ClientApp handler: whatever goes wrong becomes a
refusal with a code (:mod:`fedseal.common.refusals`), its explanation logged
at the site only. Nothing a handler raises reaches Flower's error reply, whose
text would leave the site.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Context, Message, RecordDict

from fedseal.client import secagg
from fedseal.client.ledger import LedgerError
from fedseal.client.once import OnceError
from fedseal.client.site import SiteSettings, reply_hold, site_name
from fedseal.client.spend import CommittedRound
from fedseal.common import egress
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.data import DataError
from fedseal.common.model import ModelError
from fedseal.common.records import JOB_KEY, ROUND_KEY, RecordError, flatten, record_to_config, state_digest
from fedseal.common.refusals import Code, Refusal, UnheldRefusal
from fedseal.common.secagg import SecAggError, UnmaskRefusedError
from fedseal.common.secagg_wire import COMPLAINTS, WireError, Y

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]

_SITE_ERRORS: tuple[tuple[type[BaseException], Code], ...] = (
    (LedgerError, Code.SITE_LEDGER),
    (OnceError, Code.SITE_RECORD),
    (DataError, Code.SITE_DATA),
    (ModelError, Code.SITE_MODEL),
    (ConfigError, Code.SITE_CONFIG),
)
_STAGE_ERRORS = (UnmaskRefusedError, SecAggError, WireError, RecordError, KeyError, TypeError, ValueError)


def refusal(msg: Message, context: Context, exc: Refusal) -> Message:
    """The reply that declines ``msg``: the code and public values leave, the detail is logged here."""
    log.warning("this site refuses %s (%s): %s", msg.metadata.message_type, exc.code, exc.detail)
    return egress.refusal_reply(
        msg, site_name(context.node_config, context.node_id), exc.refusal_code, exc.public
    )


def answered(stage: bool = False, reads_data: bool = True) -> Callable[[Handler], Handler]:
    """Wrap a handler so that every failure becomes a refusal with a code, never an error text.

    With ``stage`` (the secure-aggregation stages), a malformed, stale or
    out-of-order message is :data:`~fedseal.common.refusals.Code.MESSAGE_STAGE`
    and a second unmask :data:`~fedseal.common.refusals.Code.ROUND_UNMASKED`.
    Anything unexpected is :data:`~fedseal.common.refusals.Code.SITE_INTERNAL`,
    with its traceback in the site's own log.

    With ``reads_data`` (a handler whose work may read the site's data), the reply,
    refusals included, leaves no earlier than the site's
    :func:`~fedseal.client.site.reply_hold` after the handler began (:func:`hold`),
    whatever the handler raised; a malformed hold is the site's own
    :data:`~fedseal.common.refusals.Code.SITE_CONFIG`. The one kind of refusal not
    held is an :class:`~fedseal.common.refusals.UnheldRefusal`, which only checks
    that run before anything is read raise (today
    :func:`fedseal.client.policy.check_hold`: held, its refusal would likely arrive
    too late to be read).
    """

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def guarded(msg: Message, context: Context) -> Message:
            began = time.monotonic()
            try:
                seconds = reply_hold(context.node_config) if reads_data else 0.0
            except ConfigError as exc:  # the site's own setting, not the server's message
                return refusal(msg, context, as_refusal(exc))
            try:
                return handler(msg, context)
            except UnheldRefusal as exc:  # raised before anything is read: no hold
                seconds = 0.0
                return refusal(msg, context, exc)
            except Refusal as exc:
                return refusal(msg, context, exc)
            except Exception as exc:  # noqa: BLE001 - every failure leaves as a code only
                return refusal(msg, context, as_refusal(exc, stage))
            finally:
                hold(began, seconds, msg.metadata.message_type)

        return guarded

    return wrap


def hold(began: float, seconds: float, what: str) -> None:
    """Wait until ``seconds`` after ``began`` (``time.monotonic``).

    Work that outlasts the hold is held to the next whole multiple of ``seconds``, so
    that its reply shows only how many holds the work took, not how long; the site's log
    says so, with what to raise. Garbage the work left is collected first, so that its
    cost does not fall into the next, unheld stage.
    """
    if seconds <= 0:
        return
    gc.collect()
    spent = time.monotonic() - began
    holds = max(1, math.ceil(spent / seconds))
    if holds > 1:
        log.warning(
            "this site's reply to %s was ready after %.1f s, past its reply hold of %.1f s: it "
            "leaves after %d holds, which shows the server that its work took longer; raise "
            "--reply-hold above the longest round's work",
            what,
            spent,
            seconds,
            holds,
        )
    time.sleep(holds * seconds - spent)


def as_refusal(exc: BaseException, stage: bool = False) -> Refusal:
    """The refusal for an error raised while answering (its text stays in the detail)."""
    if stage and isinstance(exc, UnmaskRefusedError):
        return Refusal(Code.ROUND_UNMASKED, str(exc))
    if stage and isinstance(exc, _STAGE_ERRORS):
        return Refusal(Code.MESSAGE_STAGE, f"{type(exc).__name__}: {exc}")
    for kind, code in _SITE_ERRORS:
        if isinstance(exc, kind):
            return Refusal(code, f"{type(exc).__name__}: {exc}")
    log.error("unexpected error while answering the server", exc_info=exc)
    return Refusal(Code.SITE_INTERNAL, f"{type(exc).__name__}: {exc}")


def message_config(content: RecordDict) -> FedConfig:
    """The run's config from the server's message content, or a refusal saying it is invalid."""
    try:
        return record_to_config(content["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise Refusal(Code.MESSAGE_CONFIG, f"the server's run config is invalid: {exc}") from None


def message_round(content: RecordDict, context: Context) -> tuple[str, int]:
    """The job and round a server message's content is about (the run id and 0 when it names none).

    Raises
    ------
    Refusal
        If the round is not a non-negative integer.
    """
    config = content["config"]
    server_round = config.get(ROUND_KEY, 0)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise Refusal(
            Code.MESSAGE_ROUND,
            f"the server's {ROUND_KEY!r} is {server_round!r}, not a round number",
            setting=ROUND_KEY,
        )
    return str(config.get(JOB_KEY, context.run_id)), server_round


def plan_metrics(committed: CommittedRound) -> dict[str, float | int]:
    """The public numbers of a committed round (see :data:`fedseal.common.egress.TRAINING`)."""
    private = committed.private
    return {
        "epsilon": committed.epsilon if private else -1.0,
        "delta": committed.delta if private else -1.0,
        "steps": committed.steps,
        "noise-multiplier": committed.noise_multiplier,
        "sample-rate": committed.sample_rate,
    }


def status(committed: CommittedRound) -> dict[str, str | bool]:
    """The reply's status record: the site's configured name and whether the round was private."""
    return {"site": committed.site, "private": committed.private}


def _check_committed(
    committed: CommittedRound, job: str, server_round: int, update: Mapping[str, np.ndarray]
) -> None:
    if not isinstance(committed, CommittedRound):
        raise TypeError("a train reply is built only from a committed round (fedseal.client.spend)")
    if (job, server_round) != (committed.job, committed.round):
        raise ValueError(
            f"the committed round is round {committed.round} of job {committed.job}, "
            f"the message asks for round {server_round} of job {job}"
        )
    if state_digest(update) != committed.update_digest:
        raise ValueError("the update is not the one whose spend was committed")


def train_reply(
    msg: Message,
    context: Context,
    cfg: FedConfig,
    site: SiteSettings,
    committed: CommittedRound,
    update: Mapping[str, np.ndarray],
) -> Message:
    """The reply to a plain ``train``: the weighted update, its weight and the committed spend.

    Raises
    ------
    TypeError
        If ``committed`` is not a round committed by :func:`fedseal.client.spend.commit_round`.
    ValueError
        If ``update`` is not the update ``committed`` was committed for, ``msg``
        asks about another job or round, or the run is a secure one.
    """
    if cfg.secagg:
        raise ValueError("a secure round's update leaves only masked (masked_reply)")
    job, server_round = message_round(msg.content, context)
    _check_committed(committed, job, server_round, update)
    return egress.build(
        egress.train_reply_type(cfg, server_round),
        msg,
        {
            egress.UPDATE: {"*": dict(update)},
            egress.METRICS: {**plan_metrics(committed), "weight": committed.weight},
            egress.STATUS: status(committed),
        },
    )


def advert_reply(msg: Message, cfg: FedConfig, site: SiteSettings, keys: Mapping[str, bytes]) -> Message:
    """The reply to a secure round's ``train``: fresh signed keys; nothing is trained yet."""
    return egress.build(
        egress.SECAGG_ADVERT,
        msg,
        {egress.SECAGG: dict(keys), egress.STATUS: {"site": site.name, "private": cfg.dp}},
    )


def masked_reply(
    msg: Message,
    context: Context,
    routed: secagg.Routed,
    cfg: FedConfig,
    committed: CommittedRound,
    update: Mapping[str, np.ndarray],
) -> Message:
    """The reply to a secure round's masked-input stage: ``x + masks`` and the committed spend.

    The update leaves only here, encoded and masked (:func:`fedseal.client.secagg.masked_input`),
    and only as the one committed for this round.
    """
    job, server_round = secagg.round_of(context)
    _check_committed(committed, job, server_round, update)
    y, complaints = secagg.masked_input(context, routed, cfg, flatten(update), committed.weight)
    return egress.build(
        egress.SECAGG_MASKED_INPUT,
        msg,
        {
            egress.MASKED: {Y: y},
            egress.SECAGG: {COMPLAINTS: complaints},
            egress.METRICS: plan_metrics(committed),
            egress.STATUS: status(committed),
        },
    )


def evaluate_reply(msg: Message, committed: CommittedRound, scores: Mapping[str, float]) -> Message:
    """The reply to ``evaluate``: the DP accuracy and loss, and the committed spend."""
    return egress.build(
        egress.EVALUATION,
        msg,
        {
            egress.METRICS: {
                "accuracy": float(scores["accuracy"]),
                "loss": float(scores["loss"]),
                **plan_metrics(committed),
            },
            egress.STATUS: status(committed),
        },
    )


__all__ = [
    "advert_reply",
    "answered",
    "as_refusal",
    "evaluate_reply",
    "hold",
    "masked_reply",
    "message_config",
    "message_round",
    "plan_metrics",
    "refusal",
    "train_reply",
]
