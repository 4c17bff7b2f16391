"""The site agent ends cleanly: once a run's server is gone for good, and on SIGTERM.

The SuperNode is played by a real child process that prints what flwr 1.41's
SuperNode prints when its server has gone (coloured retry lines, for ever).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from fedseal.client.agent import RETRYING, ServerWatch, _supernode_once

# flwr's retry line as it reaches a log file: colour codes included
RETRY_LINE = f"\x1b[93mWARNING \x1b[0m:   {RETRYING}, retrying in 1.23 seconds\n"

FAKE_SUPERNODE = textwrap.dedent(f"""
    import sys, time
    print("INFO :      Starting Flower SuperNode", flush=True)
    while True:
        sys.stdout.write({RETRY_LINE!r}); sys.stdout.flush(); time.sleep(0.05)
""")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_says_once_that_the_server_is_lost_and_when_it_is_back():
    clock = Clock()
    watch = ServerWatch("alpha", linger=60, clock=clock)
    assert watch.line("\x1b[92mINFO \x1b[0m: Pull\n") == "INFO : Pull\n"
    first = watch.line(RETRY_LINE)
    assert first is not None and "site alpha: lost the server" in first and "60s" in first
    assert "\x1b" not in first
    clock.now += 30
    assert watch.line(RETRY_LINE) is None and watch.line(RETRY_LINE) is None
    assert watch.gone_for() == 30
    back = watch.line("INFO : Pull\n")
    assert back == "site alpha: the server is back\nINFO : Pull\n"
    assert watch.gone_for() == 0
    assert not watch.refused
    watch.line("Failed to activate SuperNode [code: 2004]\n")
    assert watch.refused


def test_the_agent_stops_with_exit_0_once_the_server_stays_away(capfd):
    watch = ServerWatch("alpha", linger=0.5)
    started = time.monotonic()
    code = _supernode_once([sys.executable, "-c", FAKE_SUPERNODE], dict(os.environ), watch)
    assert code == 0 and time.monotonic() - started < 30
    out = capfd.readouterr().out
    assert out.count("lost the server") == 1 and RETRYING not in out and "\x1b" not in out


def test_sigterm_stops_the_agent_with_exit_0_and_a_clear_line(tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(
        textwrap.dedent(f"""
        import logging, os, sys
        from fedseal.client.agent import ServerWatch, _supernode_once
        logging.basicConfig(level=logging.INFO)
        cmd = [sys.executable, "-c", {FAKE_SUPERNODE!r}]
        sys.exit(_supernode_once(cmd, dict(os.environ), ServerWatch("alpha", linger=600)))
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert "lost the server" in proc.stdout.readline() + proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped on SIGTERM (exit 0)" in err and "Traceback" not in err
