"""An in-process Grid that delivers real Flower messages to the real ClientApp.

Used by tests, benchmarks and ``fedseal audit`` to run a federation without Ray or network.

It stands in for the SuperLink only: messages, records, the ClientApp and its
per-node Context are Flower's own. ``drop`` makes a node vanish (no reply, as
after a timeout) from a given message type on, to exercise dropout paths;
``node_configs`` gives nodes a deployed site's node config (data and ledger
paths) instead of a simulation partition id; ``app`` replaces fedseal's
ClientApp (a benchmark's instrumented one).
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedseal.client.app import app as client_app

RUN_ID = 4242


class LocalGrid:
    """Minimal Grid: ``get_node_ids`` and ``send_and_receive``."""

    def __init__(
        self,
        num_nodes: int,
        drop: dict[int, str] | None = None,
        node_configs: list[dict] | None = None,
        app: ClientApp | None = None,
    ) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
        # Node ids above 2**63, as Flower's are: the wire must keep all 64 bits.
        self.nodes = [2**63 + 7919 * (i + 1) for i in range(num_nodes)]
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {
            n: Context(
                run_id=RUN_ID, node_id=n, node_config=dict(configs[i]), state=RecordDict(), run_config={}
            )
            for i, n in enumerate(self.nodes)
        }
        self.drop = {self.nodes[i]: stage for i, stage in (drop or {}).items()}
        self.gone: set[int] = set()
        self.sent: list[str] = []
        self.app = app or client_app

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            if not msg.metadata.message_id:  # as Flower's grids do, so replies name their request
                msg.metadata.__dict__["_message_id"] = str(uuid4())
            node = msg.metadata.dst_node_id
            self.sent.append(msg.metadata.message_type)
            if self.drop.get(node) == msg.metadata.message_type:
                self.gone.add(node)
            if node in self.gone:
                continue  # vanished: no reply before the timeout
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as exc:  # what Flower turns into an error reply
                replies.append(Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies
