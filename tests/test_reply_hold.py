"""A site's reply hold: when a reply leaves must not track how many records the site read.

The server sees when each reply arrives. With ``--reply-hold`` every reply whose work
may read the site's data (train, the masked input, evaluate; refusals too) leaves at
the same delay after its handling began, whatever the work took, as long as the work fits in
the hold; a reply that is late says so in the site's own log.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from flwr.app import Context, Message, RecordDict

from fedseal.client import reply
from fedseal.client.policy import check_hold
from fedseal.client.site import reply_hold
from fedseal.common import egress
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.data import DataError
from fedseal.common.refusals import Code, Refusal, UnheldRefusal
from fedseal.common.secagg_wire import CONSISTENCY, MASKED_INPUT, SHARE_KEYS, UNMASK
from simulations.bench.local_grid import LocalGrid

HOLD = 1.0  # seconds: the real app's hold below


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
    return LocalGrid(1, node_configs=[{"reply-hold": HOLD, "site-name": "alpha"}])


@pytest.fixture
def clock(monkeypatch, grid):
    fake = Clock()
    monkeypatch.setattr(reply, "time", SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep))
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


def test_work_that_outlasts_the_hold_leaves_at_a_whole_number_of_holds_and_says_so(clock, caplog):
    """Only how many holds the work took shows, not how long: 4.0 s and 5.9 s of work both
    leave after two holds of 3 s."""
    for work in (4.0, 5.9):
        began = clock.now
        with caplog.at_level(logging.WARNING, logger=reply.__name__):
            reply.answered()(_working(clock, work))(_msg(), _context(**{"reply-hold": 3.0}))
        assert clock.now - began == pytest.approx(6.0)
    assert "ready after 4.0 s, past its reply hold of 3.0 s: it leaves after 2 holds" in caplog.text
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


def _refusing(clock: Clock, code: Code, kind: type[Refusal] = Refusal):
    def handler(msg: Message, context: Context) -> Message:
        clock.now += 0.1  # the policy checks, before anything is read
        raise kind(code, "the site's policy")

    return handler


def test_a_run_whose_timeout_the_hold_would_outlast_is_refused_unheld_and_other_refusals_held(clock):
    """Held, the refusal of a timeout below two holds would likely never reach the server:
    :func:`check_hold` raises it unheld and it leaves at once; any other refusal of a stage
    that reads data waits out the hold, the same code raised as a plain refusal too (the
    exemption belongs to the check that runs before anything is read, not to the code)."""
    with pytest.raises(UnheldRefusal):
        check_hold(3.0, FedConfig(timeout=5.0))
    began = clock.now
    out = reply.answered()(_refusing(clock, Code.POLICY_TIMEOUT, UnheldRefusal))(
        _msg(), _context(**{"reply-hold": 3.0})
    )
    assert clock.now - began == pytest.approx(0.1)
    assert out.content[egress.REFUSAL]["code"] == Code.POLICY_TIMEOUT
    for code in (Code.POLICY_MODEL, Code.POLICY_TIMEOUT):
        began = clock.now
        out = reply.answered()(_refusing(clock, code))(_msg(), _context(**{"reply-hold": 3.0}))
        assert clock.now - began == pytest.approx(3.0)
        assert out.content[egress.REFUSAL]["code"] == code


def test_the_runs_timeout_must_leave_room_for_two_holds():
    """One hold that overruns into a second, the SuperNode's polling and the upload."""
    cfg = FedConfig(timeout=30.0)
    check_hold(0.0, cfg)  # no hold: any timeout
    check_hold(15.0, cfg)
    for hold in (15.1, 30.0, 45.0):
        with pytest.raises(Refusal) as refused:
            check_hold(hold, cfg)
        assert refused.value.refusal_code is Code.POLICY_TIMEOUT
        assert refused.value.public == {"setting": "timeout", "asked": 30.0, "limit": 2 * hold}
        assert f"raise timeout to at least {2 * hold:g} s, or the site operator lower its --reply-hold" in (
            refused.value.detail
        )


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), 1e300, "30", True])
def test_a_malformed_hold_in_the_node_config_is_named(bad):
    with pytest.raises(ConfigError, match="set it to a number of seconds from 0 to 86400"):
        reply_hold({"reply-hold": bad})
    assert reply_hold({}) == 0.0 and reply_hold({"reply-hold": 2}) == 2.0
    assert reply_hold({"reply-hold": 86400.0}) == 86400.0


def test_a_malformed_hold_is_the_sites_own_config_error_even_at_a_stage(clock):
    out = reply.answered(stage=True)(_working(clock, 0.5))(_msg(), _context(**{"reply-hold": "soon"}))
    assert out.content[egress.REFUSAL]["code"] == Code.SITE_CONFIG


@pytest.mark.parametrize(
    "message_type, held",
    [
        ("train", True),
        (f"train.{MASKED_INPUT}", True),
        ("evaluate", True),
        (f"train.{SHARE_KEYS}", False),
        (f"train.{CONSISTENCY}", False),
        (f"train.{UNMASK}", False),
    ],
)
def test_the_site_app_holds_the_stages_that_read_data_and_only_those(grid, message_type, held):
    """The ClientApp itself: each handler is refused at once (an empty message), and its refusal
    leaves after the hold where the stage's work reads the site's data (training, the masked
    input, evaluation), at once where it reads none (the keys, consistency and unmask stages)."""
    began = time.monotonic()
    [out] = grid.send_and_receive([_msg(message_type, grid.nodes[0])])
    took = time.monotonic() - began
    assert out.content[egress.REFUSAL]["code"]
    assert (took >= HOLD) if held else (took < HOLD / 2)
