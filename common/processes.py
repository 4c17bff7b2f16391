"""Starting Flower's own processes (SuperLink, SuperNode, CLI) from fedseal's commands."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from fedseal.common.config import ConfigError
from fedseal.common.errors import FedsealError


class ProcessError(FedsealError, RuntimeError):
    """A Flower executable is missing from this environment."""

    code = "process.error"


def split_address(address: str, what: str = "address", example: str = "0.0.0.0:9093") -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) into its parts; ConfigError naming ``what`` if malformed."""
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {address!r} must be HOST:PORT, e.g. {example}")
    return host, int(port)


def port_open(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (1 s timeout)."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def flwr_bin(name: str) -> str:
    """An executable of this environment (the flwr CLIs live beside our Python)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            raise ProcessError(
                f"{name} not found beside {sys.executable} or on PATH; install "
                "fedseal in this environment (pip install fedseal)"
            )
        return found
    return str(path)


def child_env(flwr_home: Path) -> dict[str, str]:
    """Environment of Flower's processes: our bin folder first (it starts `flower-superexec`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def die_with_parent() -> None:
    """In the child: private files (umask 077), and SIGTERM when the parent dies (Linux)."""
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
