"""The privacy ledger: persistent, tamper-evident, atomic, never double-counts a round."""

from __future__ import annotations

import json
import os
import stat

import pytest

from common import durable
from client.ledger import LedgerError, PrivacyLedger, checksum


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.json"


def test_create_record_reopen(path):
    led = PrivacyLedger.open(path, "site-a", 8.0, 1e-5)
    assert path.is_file() and led.entries == () and led.epsilon_spent() == 0.0
    assert led.steps_done("run-1") == 0 and not led.has_round("run-1", 1)
    led.record("run-1", 1, 20, 1.5)
    led.record("run-1", 2, 40, 2.25)
    again = PrivacyLedger.open(path, "site-a", 8.0, 1e-5)
    assert again.steps_done("run-1") == 40
    assert again.epsilon_spent("run-1") == 2.25
    assert again.has_round("run-1", 2) and not again.has_round("run-2", 2)
    assert [(e.run, e.round, e.steps, e.epsilon) for e in again.entries] == [
        ("run-1", 1, 20, 1.5), ("run-1", 2, 40, 2.25)]
    body = json.loads(path.read_text())
    assert set(body) == {"version", "site", "target_epsilon", "delta", "entries", "checksum"}
    assert body["checksum"] == checksum(body) and body["entries"][0]["time"].endswith("+00:00")


def test_runs_compose(path):
    led = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    led.record("a", 1, 10, 1.0)
    led.record("a", 2, 20, 1.5)
    led.record("b", 1, 10, 2.0)
    assert led.epsilon_spent("a") == 1.5
    assert led.epsilon_spent() == pytest.approx(3.5)
    assert led.remaining() == pytest.approx(4.5)


def test_tampered_byte_is_refused(path):
    PrivacyLedger.open(path, "s", 8.0, 1e-5).record("r", 1, 20, 1.5)
    raw = bytearray(path.read_bytes())
    i = raw.index(b'"site"') + len(b'"site": "')
    raw[i] = ord("x")  # "s" -> "x": still valid JSON
    path.write_bytes(bytes(raw))
    with pytest.raises(LedgerError, match="modified or corrupted.*restore it from backup.*never reset"):
        PrivacyLedger.open(path, "x", 8.0, 1e-5)
    path.write_bytes(bytes(raw[:-10]))  # truncated: not JSON at all
    with pytest.raises(LedgerError, match="modified or corrupted"):
        PrivacyLedger.open(path, "s", 8.0, 1e-5)


def test_hand_edited_epsilon_is_refused(path):
    PrivacyLedger.open(path, "s", 8.0, 1e-5).record("r", 1, 20, 7.5)
    body = json.loads(path.read_text())
    body["entries"][0]["epsilon"] = 0.5  # under-report the spend, checksum left as it was
    path.write_text(json.dumps(body, indent=2))
    with pytest.raises(LedgerError, match="checksum mismatch"):
        PrivacyLedger.open(path, "s", 8.0, 1e-5)


def test_budget_or_site_change_is_refused(path):
    PrivacyLedger.open(path, "s", 8.0, 1e-5)
    with pytest.raises(LedgerError, match="created for epsilon=8.0.*set the node config"):
        PrivacyLedger.open(path, "s", 16.0, 1e-5)
    with pytest.raises(LedgerError, match="delta=1e-05.*now asks for"):
        PrivacyLedger.open(path, "s", 8.0, 1e-6)
    with pytest.raises(LedgerError, match="belongs to site 's'"):
        PrivacyLedger.open(path, "t", 8.0, 1e-5)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.open(tmp_path / "nope" / "ledger.json", "s", 8.0, 1e-5)


def test_atomic_write_leaves_no_temp_file(path, monkeypatch):
    led = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    led.record("r", 1, 20, 1.0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        led.record("r", 2, 40, 2.0)
    assert path.read_bytes() == before  # the old ledger is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    assert not led.has_round("r", 2)  # the failed entry is not kept in memory either


def test_fsync_is_called(path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    PrivacyLedger.open(path, "s", 8.0, 1e-5).record("r", 1, 1, 0.1)
    assert len(calls) >= 4  # file and folder, at creation and at the record


def test_duplicate_round_is_not_double_counted(path):
    led = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    led.record("r", 1, 20, 1.5)
    mtime = path.stat().st_mtime_ns
    led.record("r", 1, 20, 1.5)  # identical: a no-op
    assert path.stat().st_mtime_ns == mtime
    assert len(PrivacyLedger.open(path, "s", 8.0, 1e-5).entries) == 1
    with pytest.raises(LedgerError, match="already in the ledger.*cannot rewrite"):
        led.record("r", 1, 20, 1.7)
    assert led.epsilon_spent() == 1.5


def test_retried_round_counts_its_extra_spend(path):
    led = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    led.record("r", 1, 20, 1.5, noise_multiplier=0.9, sample_rate=0.01)
    led.record("r", 1, 40, 2.1, noise_multiplier=0.9, sample_rate=0.01)  # the server asked again
    reopened = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    assert [(e.round, e.steps) for e in reopened.entries] == [(1, 20), (1, 40)]
    assert reopened.steps_done("r") == 40 and reopened.epsilon_spent() == 2.1
    assert reopened.plan_of("r") == (0.9, 0.01) and reopened.plan_of("other") is None


def test_cumulative_values_cannot_go_down(path):
    led = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    led.record("r", 1, 20, 1.5)
    with pytest.raises(LedgerError, match="cannot go down"):
        led.record("r", 2, 10, 1.0)
    with pytest.raises(LedgerError, match="finite"):
        led.record("r", 2, 40, float("inf"))


def test_file_changed_behind_our_back_is_refused(path):
    first = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    second = PrivacyLedger.open(path, "s", 8.0, 1e-5)
    second.record("r", 1, 20, 1.5)
    with pytest.raises(LedgerError, match="changed since it was opened"):
        first.record("r", 2, 40, 2.0)
    assert PrivacyLedger.open(path, "s", 8.0, 1e-5).steps_done("r") == 20
