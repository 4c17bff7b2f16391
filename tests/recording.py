"""A LocalGrid that keeps every reply the sites send (for the tests that inspect replies)."""

from __future__ import annotations

from flwr.app import Message

from fedseal.common.records import ROUND_KEY
from simulations.bench.local_grid import LocalGrid


class Recording(LocalGrid):
    """LocalGrid that keeps every reply the sites send, with its request's type and round."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[tuple[str, int, Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        asked = {m.metadata.message_id: (m.metadata.message_type, round_of(m)) for m in messages}
        self.replies += [(*asked[r.metadata.reply_to_message_id], r) for r in replies]
        return replies


def round_of(msg: Message) -> int:
    """The round a request belongs to: its config's, or its SecAgg+ record's."""
    content = msg.content
    if "config" in content.config_records:
        return int(content["config"][ROUND_KEY])
    return int(content["secagg"]["round"])
