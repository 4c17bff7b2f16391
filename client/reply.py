"""What a site answers to ``train`` and ``evaluate``: refusals, and replies built from committed spend.

A train reply can only be built from a :class:`~fedseal.client.spend.CommittedRound`,
which only :func:`fedseal.client.spend.commit_round` makes, after the round's spend is
in the ledger: "spend recorded before anything leaves" is a matter of types,
not of statement order. Every number the reply carries about privacy (epsilon,
steps, noise multiplier) and the weight are read from that one object, and the
update, the job and the round must be the ones it was committed for.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedseal.client import secagg
from fedseal.client.site import SiteSettings
from fedseal.client.spend import CommittedRound
from fedseal.common.config import FedConfig
from fedseal.common.records import JOB_KEY, ROUND_KEY, flatten, state_digest, state_to_record

log = logging.getLogger(__name__)

STATUS = "status"  # the reply's ConfigRecord: site name, private, or refused + reason
REFUSED = "refused"


class Refusal(Exception):
    """The site declines this message; the reason goes back to the server."""


def refusal(msg: Message, site_name: str, reason: str) -> Message:
    """A reply that declines ``msg``, saying why (the server logs it and records it in metrics)."""
    log.warning("site %s refuses %s: %s", site_name, msg.metadata.message_type, reason)
    return Message(RecordDict({STATUS: ConfigRecord({"site": site_name, REFUSED: reason})}),
                   reply_to=msg)


def message_round(msg: Message, context: Context) -> tuple[str, int]:
    """The job and round a server message is about (the run id and 0 when it names none).

    Raises
    ------
    Refusal
        If the round is not a non-negative integer.
    """
    config = msg.content["config"]
    server_round = config.get(ROUND_KEY, 0)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise Refusal(f"the server's {ROUND_KEY!r} is {server_round!r}, not a round number")
    return str(config.get(JOB_KEY, context.run_id)), server_round


def train_reply(msg: Message, context: Context, cfg: FedConfig, site: SiteSettings,
                committed: CommittedRound, update: Mapping[str, np.ndarray],
                loss: float) -> Message:
    """The reply to ``train``: public keys (secure aggregation) or the weighted update (plain).

    The weight is the committed round's.

    Raises
    ------
    TypeError
        If ``committed`` is not a round committed by :func:`fedseal.client.spend.commit_round`.
    ValueError
        If ``update`` is not the update ``committed`` was committed for, or ``msg``
        asks about another job or round.
    """
    if not isinstance(committed, CommittedRound):
        raise TypeError("a train reply is built only from a committed round (fedseal.client.spend)")
    job, server_round = message_round(msg, context)
    if (job, server_round) != (committed.job, committed.round):
        raise ValueError(f"the committed round is round {committed.round} of job {committed.job}, "
                         f"the message asks for round {server_round} of job {job}")
    if state_digest(update) != committed.update_digest:
        raise ValueError("the update is not the one whose spend was committed")
    weight = committed.weight
    status = ConfigRecord({"site": committed.site, "private": committed.private})
    metrics = {"epsilon": committed.epsilon if committed.private else -1.0,
               "delta": committed.delta if committed.private else -1.0,
               "steps": committed.steps, "noise-multiplier": committed.noise_multiplier}
    if cfg.secagg:
        # Only public keys leave now; the update leaves masked, in a later stage. The
        # weight and the training loss stay private to the site.
        keys = secagg.begin_round(msg, context, cfg, site, committed.job, committed.round,
                                  flatten(update), weight)
        return Message(RecordDict({"secagg": keys, "metrics": MetricRecord(metrics),
                                   STATUS: status}), reply_to=msg)
    metrics.update({"weight": weight, "train-loss": loss})
    return Message(RecordDict({"update": state_to_record(update), "metrics": MetricRecord(metrics),
                               STATUS: status}), reply_to=msg)


EVAL_DECIMALS = 2  # what federated evaluation reveals: scores to 0.01, never exact fractions


def evaluate_reply(msg: Message, site_name: str, scores: Mapping[str, float]) -> Message:
    """The reply to ``evaluate``: accuracy and loss only, rounded to :data:`EVAL_DECIMALS`.

    An exact accuracy is a fraction ``correct / n`` whose denominator can name the
    site's example count; rounded to 0.01 it no longer does, though on a small file it
    still narrows the count (see the README's threat model).
    """
    return Message(RecordDict({"metrics": MetricRecord({k: round(float(scores[k]), EVAL_DECIMALS)
                                                        for k in ("accuracy", "loss")}),
                               STATUS: ConfigRecord({"site": site_name})}), reply_to=msg)


__all__ = ["REFUSED", "Refusal", "STATUS", "evaluate_reply", "message_round", "refusal",
           "train_reply"]
