"""Sending a round's training messages and summing the replies.

The result of a round, whichever path produced it, is a :class:`RoundSums`:
``sum_i w_i * update_i`` and ``sum_i w_i`` over the sites that contributed,
plus per-site metadata the sites chose to report (epsilon and delta spent, status).
With secure aggregation (:mod:`fedseal.server.secagg`) the same object is built from
the unmasked sum, and no per-site update ever exists on the server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid

from fedseal.common.records import RecordError, payload_bytes, record_to_state

log = logging.getLogger(__name__)

TIMED_OUT = 4080
"""Error code of the reply :func:`send` makes for a site that did not answer in time."""
POLL_SECONDS = (0.1, 1.0)
"""Shortest and longest pause between two pulls for replies (doubling while none come)."""


@dataclass
class RoundSums:
    """What the server learns from one round."""

    update_sum: "dict[str, np.ndarray] | None" = None
    weight_sum: float = 0.0
    epsilons: dict[str, float] = field(default_factory=dict)
    deltas: dict[str, float] = field(default_factory=dict)  # beside each site's epsilon
    train_losses: dict[str, float] = field(default_factory=dict)
    contributors: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)  # of ``failed``: those that never answered
    bytes_sent: int = 0
    bytes_received: int = 0
    abandoned: str = ""  # why the round produced no sum, if it did not
    clip: float | None = None  # per-coordinate bound of every site's update, if enforced

    def drop_spend(self, site: str) -> None:
        """Forget what ``site`` reported spending: its reply was dropped after all."""
        self.epsilons.pop(site, None)
        self.deltas.pop(site, None)

    def mean_update(self) -> "dict[str, np.ndarray] | None":
        """The weighted mean update, or None if nobody contributed.

        With :attr:`clip` set, every coordinate of the mean is bounded by it,
        whatever one site sent: a malicious site can move the mean only within
        the bound honest updates have.
        """
        if self.update_sum is None or not self.weight_sum > 0:
            return None
        mean = {k: v / self.weight_sum for k, v in self.update_sum.items()}
        if self.clip is not None:
            mean = {k: np.clip(v, -self.clip, self.clip) for k, v in mean.items()}
        return mean


def message_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content: arrays plus bytes values in config records."""
    arrays = sum(payload_bytes(rec) for rec in content.array_records.values())
    blobs = sum(len(v) for rec in content.config_records.values() for v in rec.values()
                if isinstance(v, bytes))
    return arrays + blobs


def send(grid: Grid, nodes: Iterable[int], contents: Mapping[int, RecordDict] | RecordDict,
         message_type: str, timeout: float) -> tuple[list[Message], int]:
    """Send one message per node and wait for the replies; return them and the bytes sent.

    The wait ends when every node has answered, or when ``timeout`` seconds pass
    without a new answer (:func:`exchange`): a stage of many sites takes as long
    as they keep answering, and a site that vanished costs ``timeout`` after the
    last answer. Each node that did not answer gets a reply made here, an error
    of code :data:`TIMED_OUT` that says so and how to wait longer, so every caller
    names it like any site that failed.
    """
    nodes = list(nodes)
    per_node = {n: contents for n in nodes} if isinstance(contents, RecordDict) else contents
    messages = [Message(per_node[n], dst_node_id=n, message_type=message_type) for n in nodes]
    sent = sum(message_bytes(m.content) for m in messages)
    if hasattr(grid, "push_messages"):  # a Flower Grid
        replies = exchange(grid, messages, timeout)
    else:  # an in-process grid (tests, benchmarks): every answer is in when it returns
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    # The SuperLink answers for a node that went offline with an error reply of
    # its own (source node 1): attribute it to the node it was meant for.
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
              if m.metadata.message_id}
    for reply in replies:
        dst = dst_of.get(reply.metadata.reply_to_message_id)
        if reply.has_error() and dst is not None and reply.metadata.src_node_id != dst:
            reply.metadata.__dict__["_src_node_id"] = dst
    answered = {reply.metadata.src_node_id for reply in replies}
    silent = [m for m in messages if m.metadata.dst_node_id not in answered]
    if silent:
        log.warning("%d of %d site(s) did not answer %s within %gs of the last answer, dropped "
                    "as timed out: node %s; if they are slow rather than gone, raise --timeout",
                    len(silent), len(messages), message_type, timeout,
                    ", ".join(str(m.metadata.dst_node_id) for m in silent[:20])
                    + (", ..." if len(silent) > 20 else ""))
        replies += [timed_out(m, timeout) for m in silent]
    return replies, sent


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages``, then pull replies until all are in or none came for ``timeout`` seconds."""
    waiting = {i for i in grid.push_messages(messages) if i}
    replies: list[Message] = []
    last, pause = time.monotonic(), POLL_SECONDS[0]
    while waiting:
        got = list(grid.pull_messages(waiting))
        if got:
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            last, pause = time.monotonic(), POLL_SECONDS[0]
        left = timeout - (time.monotonic() - last)
        if not waiting or left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(2 * pause, POLL_SECONDS[1])
    return replies


def timed_out(msg: Message, timeout: float) -> Message:
    """The error reply :func:`send` makes for ``msg``'s node, which did not answer in time."""
    reason = (f"timed out: no answer to {msg.metadata.message_type} within {timeout:g}s of the "
              "stage's last answer; raise --timeout if the site is slow rather than gone")
    return Message(Error(code=TIMED_OUT, reason=reason), reply_to=msg)  # from msg's node


def is_timed_out(reply: Message) -> bool:
    """Whether ``reply`` is :func:`send`'s for a node that did not answer in time."""
    return reply.has_error() and reply.error.code == TIMED_OUT


def site_of(reply: Message) -> str:
    """The name a site reports for itself (falls back to its node id)."""
    if reply.has_content() and "status" in reply.content.config_records:
        return str(reply.content["status"].get("site", reply.metadata.src_node_id))
    return str(reply.metadata.src_node_id)


def _metric(metrics: object, key: str) -> float:
    value = metrics[key]  # type: ignore[index]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric '{key}' is a {type(value).__name__}, not a number")
    return float(value)


def triage(replies: Iterable[Message], sums: RoundSums) -> list[Message]:
    """Record failures and refusals in ``sums``; return the replies that trained.

    Each reply is checked on its own: one without a metrics record or with a
    malformed one is recorded as failed, never taken down the round.
    """
    good = []
    for reply in replies:
        site = site_of(reply)
        if reply.has_error():
            sums.failed[site] = reply.error.reason.splitlines()[-1][:300] if reply.error.reason else "error"
            if is_timed_out(reply):
                sums.timed_out.append(site)
            log.warning("site %s failed this round: %s", site, sums.failed[site])
            continue
        status = reply.content["status"] if "status" in reply.content.config_records else {}
        if "refused" in status:
            sums.refused[site] = str(status["refused"])[:300]
            log.warning("site %s refused to train: %s", site, sums.refused[site])
            continue
        try:
            if "metrics" not in reply.content.metric_records:
                raise KeyError("the reply has no 'metrics' record")
            metrics = reply.content["metrics"]
            epsilon, delta = _metric(metrics, "epsilon"), _metric(metrics, "delta")
            loss = _metric(metrics, "train-loss") if "train-loss" in metrics else None
        except (KeyError, TypeError) as exc:
            sums.failed[site] = f"malformed reply: {exc}"[:300]
            log.warning("site %s failed this round: %s", site, sums.failed[site])
            continue
        sums.epsilons[site], sums.deltas[site] = epsilon, delta
        if loss is not None:  # reported only without secure aggregation
            sums.train_losses[site] = loss
        good.append(reply)
    return good


def sum_plain(replies: Iterable[Message], template: Mapping[str, np.ndarray],
              sums: RoundSums, weights: tuple[float, float], clip: float) -> RoundSums:
    """Add each reply's weighted update in the clear (secure aggregation off).

    A reply whose weight lies outside ``weights`` (the round's
    :func:`fedseal.common.weights.weight_range`) is dropped: no honest site sends it,
    and one site claiming a weight of 1e9 would make the mean its own update.
    Every entry is clipped to ``[-w * clip, w * clip]`` for the reply's weight
    ``w`` (``clip`` is the round's bound, :func:`fedseal.common.vote.round_clip`):
    an honest site's entries are ``w`` times an update within the bound, so a site
    claiming a small weight gets no more say than that weight gives it.
    """
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
    for reply in triage(replies, sums):
        site = site_of(reply)
        try:
            update = record_to_state(reply.content["update"], template, what=f"update from {site}")
            weight = float(reply.content["metrics"]["weight"])
            if not weights[0] <= weight <= weights[1]:  # NaN fails too
                raise RecordError(f"update from {site}: weight {weight} is outside "
                                  f"[{weights[0]:g}, {weights[1]:g}], the weights this round allows")
        except (RecordError, KeyError) as exc:
            sums.failed[site] = str(exc)
            sums.drop_spend(site)
            log.warning("dropping the reply of site %s: %s", site, exc)
            continue
        sums.bytes_received += message_bytes(reply.content)
        for k in total:
            total[k] += np.clip(update[k], -weight * clip, weight * clip)
        sums.weight_sum += weight
        sums.contributors.append(site)
    sums.update_sum = total if sums.contributors else None
    sums.clip = clip
    return sums
