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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedseal.common import egress
from fedseal.common.records import payload_bytes
from fedseal.common.refusals import describe
from fedseal.server.identity import SiteNames

log = logging.getLogger(__name__)

TIMED_OUT = 4080
"""Error code of the reply :func:`send` makes for a site that did not answer in time."""
POLL_SECONDS = (0.1, 1.0)
"""Shortest and longest pause between two pulls for replies (doubling while none come)."""
PROGRESS_SECONDS = 30.0
"""While sites are still answering a stage, a progress line this often."""


@dataclass
class RoundSums:
    """What the server learns from one round."""

    update_sum: dict[str, np.ndarray] | None = None
    weight_sum: float = 0.0
    epsilons: dict[str, float] = field(default_factory=dict)
    deltas: dict[str, float] = field(default_factory=dict)  # beside each site's epsilon
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

    def mean_update(self) -> dict[str, np.ndarray] | None:
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
    blobs = sum(
        len(v) for rec in content.config_records.values() for v in rec.values() if isinstance(v, bytes)
    )
    return arrays + blobs


def send(
    grid: Grid,
    nodes: Iterable[int],
    contents: Mapping[int, RecordDict] | RecordDict,
    message_type: str,
    timeout: float,
) -> tuple[list[Message], int]:
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
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    for reply in replies:
        dst = dst_of.get(reply.metadata.reply_to_message_id)
        if reply.has_error() and dst is not None and reply.metadata.src_node_id != dst:
            reply.metadata.__dict__["_src_node_id"] = dst
    answered = {reply.metadata.src_node_id for reply in replies}
    silent = [m for m in messages if m.metadata.dst_node_id not in answered]
    if silent:
        log.warning(
            "%d of %d site(s) did not answer %s within %gs of the last answer, dropped "
            "as timed out (each named as it is recorded); if they are slow rather than "
            "gone, raise --timeout",
            len(silent),
            len(messages),
            message_type,
            timeout,
        )
        replies += [timed_out(m, timeout) for m in silent]
    return replies, sent


def error_reason(reply: Message) -> str:
    """The reason code of an error reply: Flower's error code by name, never its text.

    An error reply's text can come from a site (an exception at the site), so
    only the number travels into the metrics.
    """
    names = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}
    code = reply.error.code
    return f"{egress.REPLY_ERROR}: {names.get(code, 'code')} ({code})"


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages``, then pull replies until all are in or none came for ``timeout`` seconds."""
    waiting = {i for i in grid.push_messages(messages) if i}
    replies: list[Message] = []
    started = told = last = time.monotonic()
    pause = POLL_SECONDS[0]
    stage = messages[0].metadata.message_type if messages else ""
    while waiting:
        got = list(grid.pull_messages(waiting))
        if got:
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            last, pause = time.monotonic(), POLL_SECONDS[0]
        if waiting and time.monotonic() - told >= PROGRESS_SECONDS:  # a long first round
            told = time.monotonic()
            log.info(
                "%s: %d of %d site(s) answered after %.0fs (a site's first round also "
                "reads its data and computes its features)",
                stage,
                len(replies),
                len(messages),
                told - started,
            )
        left = timeout - (time.monotonic() - last)
        if not waiting or left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(2 * pause, POLL_SECONDS[1])
    return replies


def timed_out(msg: Message, timeout: float) -> Message:
    """The error reply :func:`send` makes for ``msg``'s node, which did not answer in time."""
    reason = (
        f"timed out: no answer to {msg.metadata.message_type} within {timeout:g}s of the "
        "stage's last answer; raise --timeout if the site is slow rather than gone"
    )
    return Message(Error(code=TIMED_OUT, reason=reason), reply_to=msg)  # from msg's node


def is_timed_out(reply: Message) -> bool:
    """Whether ``reply`` is :func:`send`'s for a node that did not answer in time."""
    return reply.has_error() and reply.error.code == TIMED_OUT


def triage(
    replies: Iterable[Message], sums: RoundSums, reply_type: egress.ReplyType, names: SiteNames
) -> list[Message]:
    """Record failures and refusals in ``sums``; return the replies that trained.

    Each reply is checked on its own against ``reply_type``'s declared
    metadata and its sender's identity (:class:`~fedseal.server.identity.SiteNames`):
    one that departs from either is recorded as failed under its sender, with a
    reason code, never taken down the round. A refusal is recorded as its code
    and public values, in the server's own words
    (:func:`fedseal.common.refusals.describe`).
    """
    good = []
    for reply in replies:
        site = names.of(reply)
        if reply.has_error():
            if is_timed_out(reply):  # the server's own reply for a silent node
                sums.failed[site] = f"{egress.REPLY_TIMEOUT}: {reply.error.reason}"
                sums.timed_out.append(site)
            else:
                sums.failed[site] = error_reason(reply)
            log.warning("site %s failed this round: %s", site, sums.failed[site])
            continue
        try:
            site = names.claim(reply)
            refused = egress.refusal_of(reply)
            if refused is not None:
                sums.refused[site] = describe(*refused)
                log.warning("site %s refused to train: %s", site, sums.refused[site])
                continue
            scalars = tuple(r for r, kind in reply_type.records().items() if kind != "array")
            metrics = egress.parse(reply_type, reply, only=scalars).get(egress.METRICS)
        except egress.ReplyError as exc:
            sums.failed[site] = str(exc)[:300]
            log.warning("site %s failed this round: %s", site, sums.failed[site])
            continue
        if metrics is not None:  # a secure round's keys come before any spend
            sums.epsilons[site], sums.deltas[site] = metrics["epsilon"], metrics["delta"]
        good.append(reply)
    return good


def sum_plain(
    replies: Iterable[Message],
    template: Mapping[str, np.ndarray],
    sums: RoundSums,
    reply_type: egress.ReplyType,
    names: SiteNames,
    weights: tuple[float, float],
    clip: float,
) -> RoundSums:
    """Add the replies' weighted updates in the clear (secure aggregation off), robustly.

    Every reply is parsed against ``reply_type`` and ``template`` first
    (:func:`fedseal.common.egress.parse`); one whose weight lies outside
    ``weights`` (the round's :func:`fedseal.common.weights.weight_range`) is
    dropped and named. The server sees each site here, so it bounds what one
    site can do (:func:`robust_sum`): weights count at most the round's median
    weight, entries are clipped to the weight times ``clip`` (the round's
    bound, :func:`fedseal.common.vote.round_clip`), and a vote round's scale
    entry is the sites' median.
    """
    parsed: list[tuple[str, dict[str, np.ndarray], float]] = []
    for reply in triage(replies, sums, reply_type, names):
        site = names.of(reply)
        try:
            values = egress.parse(reply_type, reply, template=template)
            update, weight = values[egress.UPDATE]["*"], values[egress.METRICS]["weight"]
            if not weights[0] <= weight <= weights[1]:
                raise egress.ReplyError(
                    egress.REPLY_RANGE,
                    f"weight {weight} is outside "
                    f"[{weights[0]:g}, {weights[1]:g}], the weights this "
                    "round allows",
                )
        except egress.ReplyError as exc:
            sums.failed[site] = str(exc)[:300]
            sums.drop_spend(site)
            log.warning("dropping the reply of site %s: %s", site, exc)
            continue
        sums.bytes_received += message_bytes(reply.content)
        parsed.append((site, update, weight))
    if parsed:
        sums.update_sum, sums.weight_sum = robust_sum([(u, w) for _, u, w in parsed], clip)
        sums.contributors = [site for site, _, _ in parsed]
    sums.clip = clip
    return sums


def robust_sum(
    updates: list[tuple[Mapping[str, np.ndarray], float]], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """``(sum of w' * update, sum of w')`` over sites' weighted updates ``w * update``.

    What one site of ``m`` can do to the mean is bounded, whatever it sends:

    * its weight counts as at most the median weight ``med`` of the round
      (``w' = min(w, med)``, its entries scaled by ``w' / w``): a site claiming
      the largest weight gets no more say than the median site;
    * each entry is clipped to ``[-w' * clip, w' * clip]``: a mean coordinate
      moves by at most ``2 * clip * w' / sum(w')``, that is ``2 * clip / m`` with
      equal weights and ``2 * clip / ceil(m / 2)`` whatever the weights (at
      least ``ceil(m / 2) - 1`` other sites count ``med`` each);
    * a vote round's scale entry (:data:`fedseal.common.vote.SCALE_KEY`) is the
      median of the sites' entries (each over its own weight), not their mean: with
      ``m >= 3`` one site cannot move the step's scale outside the range of the
      other sites' scales.
    """
    from fedseal.common.vote import SCALE_KEY

    med = float(np.median([w for _, w in updates]))
    total: dict[str, np.ndarray] = {}
    weight_sum = 0.0
    scales = []
    for update, weight in updates:
        counted = min(weight, med)
        for k, v in update.items():
            entry = np.clip(
                np.asarray(v, dtype=np.float64) * (counted / weight), -counted * clip, counted * clip
            )
            total[k] = total.get(k, 0.0) + entry
        if SCALE_KEY in update:
            scales.append(float(np.clip(np.asarray(update[SCALE_KEY]).reshape(-1)[0] / weight, -clip, clip)))
        weight_sum += counted
    if scales:
        total[SCALE_KEY] = np.array([float(np.median(scales)) * weight_sum])
    return total, weight_sum
