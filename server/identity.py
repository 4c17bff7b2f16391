"""Who sent a reply: the sender the transport authenticated, never the name a reply claims.

Flower delivers every reply with the node id of its sender (a SuperNode
authenticated by its key in a deployment; a virtual node in a simulation).
The server keys everything it records about a site (epsilon, refusals,
failures, contributions) by that node. A reply may name its site (the
``site`` field of its status, the name its operator configured); the name is
only a label for people:

* where the server knows the authenticated node's name (a deployment: the
  admitted key's name, :func:`names_from_nodes`), a reply claiming another name
  is refused (:data:`~fedseal.common.egress.REPLY_IDENTITY`) and recorded under
  its sender;
* otherwise (a simulation) a node's first claim becomes its label, and a later
  claim of a name another node holds is refused the same way.

So no site can write its records under another's name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedseal.common import egress

log = logging.getLogger(__name__)


class SiteNames:
    """Labels of the nodes of one run, bound to the authenticated sender.

    Parameters
    ----------
    authenticated
        ``node id -> name`` the transport vouches for (empty in a simulation).
    """

    def __init__(self, authenticated: Mapping[int, str] | None = None) -> None:
        self._names: dict[int, str] = {}
        self.authenticate(authenticated or {})

    def authenticate(self, names: Mapping[int, str]) -> None:
        """Bind ``node id -> name`` as the transport vouches for it (overrides any claim)."""
        for node, name in names.items():
            for other in [n for n, v in self._names.items() if v == name and n != node]:
                del self._names[other]  # a claim of an authenticated name was a lie
            self._names[node] = name

    def name(self, node: int) -> str:
        """The node's label: its bound name, else ``node <id>``."""
        return self._names.get(node, f"node {node}")

    def of(self, reply: Message) -> str:
        """The label of a reply's sender (after checking what it claims, see :meth:`claim`)."""
        return self.name(reply.metadata.src_node_id)

    def claim(self, reply: Message) -> str:
        """Bind or check the name ``reply`` claims for its sender; return the sender's label.

        Raises
        ------
        fedseal.common.egress.ReplyError
            With :data:`~fedseal.common.egress.REPLY_IDENTITY` if the reply names a
            site that is not its sender.
        """
        node = reply.metadata.src_node_id
        claimed = _claimed(reply)
        if claimed is None:
            return self.name(node)
        if node in self._names:
            if self._names[node] != claimed:
                raise egress.ReplyError(
                    egress.REPLY_IDENTITY,
                    f"the reply names site {claimed[:40]!r}, but its sender is {self.name(node)!r}",
                )
            return claimed
        if claimed in self._names.values():
            raise egress.ReplyError(
                egress.REPLY_IDENTITY, f"the reply names site {claimed[:40]!r}, which another node is"
            )
        self._names[node] = claimed
        return claimed


def _claimed(reply: Message) -> str | None:
    """The site name a reply's status carries, if it is a short text."""
    if reply.has_error() or not reply.has_content():
        return None
    if egress.STATUS not in reply.content.config_records:
        return None
    name = reply.content[egress.STATUS].get("site", None)
    return name if isinstance(name, str) and 0 < len(name) <= egress.MAX_TEXT else None


def admitted_keys(roster: str | Path) -> dict[bytes, str]:
    """``DER public key -> site name`` for every ``NAME.pub`` (OpenSSH) in the roster folder."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    out = {}
    for path in sorted(Path(roster).glob("*.pub")):
        try:
            key = load_ssh_public_key(path.read_bytes().strip())
        except (ValueError, OSError) as exc:
            log.warning("ignoring the unreadable site key %s (%s)", path, exc)
            continue
        out[_der(key)] = path.stem
    return out


def names_from_nodes(nodes: Iterable[Any], admitted: Mapping[bytes, str]) -> dict[int, str]:
    """``node id -> name`` for the nodes whose authenticated public key is an admitted one.

    ``nodes`` are Flower ``NodeInfo`` records (``node_id``, ``public_key`` as PEM,
    as the SuperLink stores it); ``admitted`` is :func:`admitted_keys`.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    out = {}
    for info in nodes:
        pem = bytes(getattr(info, "public_key", b"") or b"")
        try:
            der = _der(load_pem_public_key(pem)) if pem else b""
        except ValueError:
            continue
        if der in admitted:
            out[int(info.node_id)] = admitted[der]
    return out


def _der(key: object) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


__all__ = ["SiteNames", "admitted_keys", "names_from_nodes"]
