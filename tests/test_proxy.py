"""The reverse proxy, real Caddy on 127.0.0.1: only the exact Fleet paths pass, unchanged.

Caddy (started by :class:`FleetProxy`, as ``fedseal server`` starts it) sits in front
of a small upstream that records every request it receives. Requests are written to a
raw socket, so no client library cleans or encodes the target before Caddy sees it.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

from fedseal.server.keys import init_keys, parse_hosts
from fedseal.server.proxy import FLEET_PATHS, FleetProxy

# Every way to spell a Fleet path other than its one canonical form; applied to each path.
SPELLINGS = {
    "upper case": str.upper,
    "one capital": lambda p: p[:-1] + p[-1].upper(),
    "capital V": lambda p: p.replace("/v1/", "/V1/"),
    "leading //": lambda p: "/" + p,
    "inner //": lambda p: p.replace("/fleet/", "/fleet//"),
    "/./": lambda p: p.replace("/fleet/", "/fleet/./"),
    "/../": lambda p: p.replace("/fleet/", "/fleet/x/../"),
    "%76 for v": lambda p: p.replace("v", "%76", 1),
    "%2F for /": lambda p: p.replace("/fleet/", "/fleet%2F"),
    "%2f for /": lambda p: p.replace("/fleet/", "/fleet%2f"),
    "%2e dot segment": lambda p: p.replace("/fleet/", "/fleet/%2e/"),
    "%2D for -": lambda p: p.replace("-", "%2D"),
    "trailing /": lambda p: p + "/",
    "trailing /.": lambda p: p + "/.",
    "trailing %2F": lambda p: p + "%2F",
    "backslashes": lambda p: p.replace("/fleet/", "\\fleet\\"),
    "%5C for /": lambda p: p.replace("/fleet/", "/fleet%5C"),
    "bare ?": lambda p: p + "?",
    "query": lambda p: p + "?run_id=1",
    "fragment": lambda p: p + "#top",
    "; parameter": lambda p: p + ";x",
    "%00": lambda p: p + "%00",
    "%20": lambda p: p + "%20",
    "absolute form": lambda p: "http://localhost" + p,
    "longer": lambda p: p + "x",
    "overlong (16 KiB)": lambda p: p + "a" * 16384,
}
OTHER_TARGETS = [
    "/",
    "*",
    "/v1/fleet",
    "/v1/fleet/",
    "/v1/control/list-runs",
    "/v1/runtime/pull-messages",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs",
]
OTHER_METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "post", "Post"]
# Flower's SuperNode signs each Fleet call in these headers; the proxy passes them through.
SIGNED = {
    FLEET_HTTP_PUBLIC_KEY_HEADER: "cHVibGljIGtleQ==",
    TIMESTAMP_HEADER: "2026-01-01T00:00:00",
    FLEET_HTTP_SIGNATURE_HEADER: "c2lnbmF0dXJl",
}


@dataclass
class Received:
    """What reached the upstream: each request's raw head (request line, headers) and body."""

    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _read_request(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request from ``sock``: its head and its ``Content-Length`` body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed inside the request head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside the request body")
        body += chunk
    return head, body


def _upstream(context: ssl.SSLContext | None) -> tuple[socketserver.ThreadingTCPServer, Received]:
    """A stand-in SuperLink on 127.0.0.1 that answers 200 and records every request."""
    received = Received()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            if context is not None:
                sock = context.wrap_socket(sock, server_side=True)
            received_request = _read_request(sock)
            with received.lock:
                received.requests.append(received_request)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nupstream")
            sock.close()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, received


@dataclass
class Proxy:
    """A running Caddy, how to reach it, and what its upstream received."""

    port: int
    client_tls: ssl.SSLContext | None
    received: Received

    def send(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Status and body of one request written verbatim to the proxy's socket."""
        lines = [
            f"{method} {target} HTTP/1.1",
            "Host: localhost",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms per TLS call
            sock = (
                self.client_tls.wrap_socket(raw, server_hostname="localhost")
                if self.client_tls is not None
                else raw
            )
            sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        status_line, _, rest = response.partition(b"\r\n")
        return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.fixture(params=["tls", "insecure"])
def proxy(request, tmp_path: Path) -> Iterator[Proxy]:
    """Caddy as ``fedseal server`` runs it (TLS both sides) and as ``--insecure`` trials do."""
    tls = client_tls = upstream_tls = None
    if request.param == "tls":
        keys = tmp_path / "keys"
        init_keys(keys, parse_hosts(["localhost"]))
        tls = (keys / "server.pem", keys / "server.key", keys / "ca.pem")
        upstream_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        upstream_tls.load_cert_chain(tls[0], tls[1])
        client_tls = ssl.create_default_context(cafile=str(tls[2]))
    server, received = _upstream(upstream_tls)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "state"
    state.mkdir()
    fleet_proxy = FleetProxy(state, f"127.0.0.1:{port}", f"127.0.0.1:{server.server_address[1]}", tls)
    try:
        fleet_proxy.start(f"127.0.0.1:{port}")
        yield Proxy(port, client_tls, received)
    finally:
        fleet_proxy.stop()
        server.shutdown()
        server.server_close()


def test_only_exact_fleet_paths_reach_the_superlink_unchanged(proxy):
    # Every other spelling of every Fleet path, every other target, every other method:
    # a 404 from the proxy itself, and nothing at the upstream.
    targets = [spell(path) for path in FLEET_PATHS for spell in SPELLINGS.values()] + OTHER_TARGETS
    assert not set(targets) & set(FLEET_PATHS)  # each spelling really differs
    refused = [("POST", target) for target in targets] + [
        (method, path) for path in FLEET_PATHS for method in OTHER_METHODS
    ]
    answers = {(method, target): proxy.send(method, target) for method, target in refused}
    assert {key: status for key, (status, _) in answers.items() if status != 404} == {}
    assert all(
        body == b"" if method == "HEAD" else body.startswith(b"not found: this address")
        for (method, _), (_, body) in answers.items()
    )
    # A request line longer than Caddy reads is refused by Caddy itself.
    assert proxy.send("POST", FLEET_PATHS[0] + "a" * 65536)[0] == 431
    assert proxy.received.requests == []

    # Each exact Fleet path with POST reaches the upstream once, byte for byte: the
    # request line it matched, the signed headers and the body.
    for number, path in enumerate(FLEET_PATHS):
        body = f"protobuf {number}\x00\xff".encode("latin-1")
        assert proxy.send("POST", path, body, SIGNED) == (200, b"upstream"), path
        head, forwarded = proxy.received.requests[-1]
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        assert request_line == f"POST {path} HTTP/1.1"
        assert forwarded == body
        headers = {
            name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)
        }
        assert {name.lower(): value for name, value in SIGNED.items()}.items() <= headers.items()
    assert len(proxy.received.requests) == len(FLEET_PATHS)
