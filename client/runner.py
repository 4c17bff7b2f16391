"""The site's ClientApp runner: one long-lived process that runs only the installed fedseal.

``fedseal client`` starts the SuperNode with ``--isolation process`` (it then
starts no ClientApp processes of its own) and this runner beside it. The
runner asks the SuperNode's Runtime API (on 127.0.0.1, its task requests
signed with a secret only the agent holds) for each message the site
received, and for each one:

1. pulls the message, the run's context and its app bundle (a thread per
   task: a task whose message can never arrive, such as one of a run stopped
   while the site was receiving it, must not hold up the others);
2. checks the run's app bundle against the code this site installed
   (:mod:`fedseal.client.pinning`); a run that ships anything else is refused with a
   reply the server logs, and none of its code is imported or run;
3. otherwise hands the message and the run's context to the installed
   ``fedseal.client.app:app``, imported once when the runner starts; messages are
   answered one at a time, in the order they arrived;
4. pushes the reply and the updated context back to the SuperNode.

Besides pinning the code, a long-lived process pays torch's, transformers'
and Opacus's import cost once, not once per message as Flower's default
subprocess isolation does.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from flwr.app import Context, Message
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedseal.client.pinning import CodePinError, check_fab, installed_manifest, manifest_digest
from fedseal.client.reply import as_refusal, refusal
from fedseal.common.refusals import Code, Refusal

log = logging.getLogger("fedseal.client")

POLL_S = 0.5
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the call Flower signs with the SuperExec secret


def _client(address: str, *interceptors) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Keep the task alive at the SuperNode; a failure never stops the runner."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(request).success)
        except httpx.HTTPError:
            return False

    return beat


@dataclass
class _Task:
    """One acquired task whose input has arrived, waiting for its turn."""

    client: RuntimeHttpClient
    heartbeat: HeartbeatSender
    message: Message
    context: Context
    run: Run
    fab: Fab


class Runner:
    """Runs the installed ClientApp for every task the SuperNode hands out."""

    def __init__(self, address: str, secret: bytes) -> None:
        from fedseal.client.app import app  # the installed app, imported once (torch and all)

        self.address, self.app = address, app
        self.tasks = _client(
            address, SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE})
        )
        self.verdicts: dict[str, str] = {}  # sha256 of a FAB's bytes -> "" (pinned) or the refusal
        self.ready: queue.Queue[_Task] = queue.Queue()

    def serve(self) -> None:
        """Poll the SuperNode for tasks until stopped; answer them one at a time."""
        log.info(
            "ClientApp runner: installed fedseal code %s; serving %s",
            manifest_digest(installed_manifest())[:16],
            self.address,
        )
        threading.Thread(target=self._answer_forever, name="answer", daemon=True).start()
        while True:
            try:
                res = self.tasks.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
                )
            except httpx.HTTPError as exc:
                log.debug("SuperNode not ready (%s)", exc)
                time.sleep(POLL_S)
                continue
            if res.HasField("task") and res.token:
                threading.Thread(target=self.receive, args=(res.token,), daemon=True).start()
            else:
                time.sleep(POLL_S)

    def receive(self, token: str) -> None:
        """Pull one task's input; queue it for :meth:`answer`, or report the task failed."""
        client = _client(self.address, RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(_heartbeat(client))
        heartbeat.start()
        try:
            message, context, run, fab = pull_task_input(client)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning("a task's message could not be received (%s); it is dropped", exc)
            _finish(client, heartbeat, None, SubStatus.FAILED, "the message could not be received")
            return
        self.ready.put(_Task(client, heartbeat, message, context, run, fab))

    def _answer_forever(self) -> None:
        while True:
            self.answer(self.ready.get())

    def verdict(self, fab: Fab) -> str:
        """``""`` if ``fab`` is the installed fedseal, else why it is refused.

        Remembered by the SHA-256 of the bundle's bytes as received, never by the
        hash the server claims for it (``fab.hash_str``): a changed bundle sent
        under the hash of one accepted before is checked, and refused, afresh.
        """
        key = hashlib.sha256(fab.content).hexdigest()
        if key not in self.verdicts:
            try:
                check_fab(fab.content)
                self.verdicts[key] = ""
            except CodePinError as exc:
                self.verdicts[key] = str(exc)
        return self.verdicts[key]

    def answer(self, task: _Task) -> None:
        """Answer one message (or refuse the run's code); push the reply and the context."""
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            reason = self.verdict(task.fab)
            if reason:
                log.error("refused run %s: %s", task.run.run_id, reason)
                reply = refusal(
                    task.message,
                    task.context,
                    Refusal(Code.SITE_CODE, f"this site runs only the fedseal it installed: {reason}"),
                )
            else:
                reply = self._call(task.message, task.context)
            push_message(task.client, reply, task.context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # The details travel to the SuperNode's status report: a fixed text, never
            # the exception's, which could name something of the site's.
            log.error("a ClientApp task failed: %s", exc, exc_info=exc)
        finally:
            _finish(task.client, task.heartbeat, task.context, status, details)

    def _call(self, message: Message, context: Context) -> Message:
        """The installed app's reply; anything it raises becomes a refusal with a code."""
        TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
        try:
            return self.app(message=message, context=context)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            return refusal(message, context, as_refusal(exc))


def _finish(
    client: RuntimeHttpClient, heartbeat: HeartbeatSender, context: Context | None, status: str, details: str
) -> None:
    push_task_output(client=client, context=context, sub_status=status, details=details)
    heartbeat.stop()
    client.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedseal.client.runner``: started by ``fedseal client``, not by hand."""
    parser = argparse.ArgumentParser(
        prog="python -m fedseal.client.runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runtime-api-address", required=True, metavar="127.0.0.1:PORT")
    parser.add_argument("--auth-secret-file", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    from fedseal.common.cli_args import setup_logging

    setup_logging()
    with open(args.auth_secret_file, "rb") as fh:
        secret = fh.read()
    try:
        Runner(args.runtime_api_address, secret).serve()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
