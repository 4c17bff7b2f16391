"""A site's reply hold: when a reply leaves must not track how many records the site read.

The server sees when each reply arrives. With ``--reply-hold`` every reply whose work
may read the site's data (train, the masked input, evaluate; refusals too) leaves at
the same delay after its message, whatever the work took, as long as the work fits in
the hold; a reply that is late says so in the site's own log.
"""

from __future__ import annotations

import logging
import time

import pytest
from flwr.app import Context, Message, RecordDict

from fedseal.client import reply
from fedseal.client.site import reply_hold
from fedseal.common import egress
from fedseal.common.config import ConfigError
from fedseal.common.data import DataError
from fedseal.common.refusals import Code
from fedseal.common.secagg_wire import SHARE_KEYS
from simulations.bench.local_grid import LocalGrid


class Clock:
    """A monotonic clock that moves only when the work or the hold says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def _msg(message_type: str = "train", node: int = 1) -> Message:
    msg = Message(RecordDict(), dst_node_id=node, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m"
    return msg


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture
def grid():
    """One site over the in-process grid (it sets the task identity that messages need)."""
    return LocalGrid(1, node_configs=[{"reply-hold": 0.6, "site-name": "alpha"}])


@pytest.fixture
def clock(monkeypatch, grid):
    fake = Clock()
    monkeypatch.setattr(reply.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(reply.time, "sleep", fake.sleep)
    return fake


def _working(clock: Clock, seconds: float, fails: bool = False):
    def handler(msg: Message, context: Context) -> Message:
        clock.now += seconds  # the work: a site's records, forward and backward
        if fails:
            raise DataError("the site's file has a bad row")
        return msg

    return handler


@pytest.mark.parametrize("work, fails", [(0.2, False), (2.5, False), (1.0, True)])
def test_a_reply_leaves_at_the_hold_whatever_the_work_took(clock, work, fails):
    began = clock.now
    out = reply.answered()(_working(clock, work, fails))(_msg(), _context(**{"reply-hold": 3.0}))
    assert clock.now - began == pytest.approx(3.0)
    assert out.has_content()


def test_a_reply_whose_work_outlasts_the_hold_leaves_when_ready_and_says_so_at_the_site(clock, caplog):
    began = clock.now
    with caplog.at_level(logging.WARNING, logger=reply.__name__):
        reply.answered()(_working(clock, 4.0))(_msg(), _context(**{"reply-hold": 3.0}))
    assert clock.now - began == pytest.approx(4.0)
    assert "ready after 4.0 s, past its reply hold of 3.0 s" in caplog.text
    assert "raise --reply-hold" in caplog.text


def test_without_a_hold_or_for_a_stage_that_reads_no_data_the_reply_leaves_when_ready(clock, caplog):
    began = clock.now
    reply.answered()(_working(clock, 0.5))(_msg(), _context())
    assert clock.now - began == pytest.approx(0.5)
    began = clock.now
    reply.answered(stage=True, reads_data=False)(_working(clock, 0.5))(
        _msg(), _context(**{"reply-hold": 3.0})
    )
    assert clock.now - began == pytest.approx(0.5)
    assert "reply hold" not in caplog.text


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "30", True])
def test_a_malformed_hold_in_the_node_config_is_named(bad):
    with pytest.raises(ConfigError, match="set it to a number of seconds >= 0"):
        reply_hold({"reply-hold": bad})
    assert reply_hold({}) == 0.0 and reply_hold({"reply-hold": 2}) == 2.0


def test_the_site_app_holds_a_refusal_and_not_a_key_stage(grid):
    """The ClientApp itself: an empty train message is refused only after the hold; a
    malformed key-sharing stage, whose work reads no data, at once."""
    node = grid.nodes[0]
    began = time.monotonic()
    [refused] = grid.send_and_receive([_msg("train", node)])
    held = time.monotonic() - began
    began = time.monotonic()
    [stage] = grid.send_and_receive([_msg(f"train.{SHARE_KEYS}", node)])
    at_once = time.monotonic() - began
    assert held >= 0.6 and at_once < 0.6
    assert refused.content[egress.REFUSAL]["code"] == Code.MESSAGE_CONFIG
    assert stage.content[egress.REFUSAL]["code"] == Code.MESSAGE_STAGE
