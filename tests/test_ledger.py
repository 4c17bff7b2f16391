"""The privacy ledger: MACed under a site key, checked against a counter, atomic, never
double-counts a round; edits, older copies and deletions are refused; recovery keeps spend."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from fedseal.client import ledger_cli
from fedseal.client.ledger import LedgerError, PrivacyLedger, recover
from fedseal.client.ledger_seal import (COUNTER_CONTEXT, LEDGER_CONTEXT, Counter, canonical, counter_path,
                                mac)
from fedseal.common import durable


@pytest.fixture
def path(tmp_path):
    (tmp_path / "data").mkdir()
    return tmp_path / "data" / "ledger.json"


@pytest.fixture
def key(tmp_path):
    (tmp_path / "secrets").mkdir()
    return tmp_path / "secrets" / "ledger.key"


def _open(path, key, site="s", epsilon=8.0, delta=1e-5):
    return PrivacyLedger.open(path, site, epsilon, delta, key_path=key)


def test_mac_byte_formats_known_answers():
    # Fixed vectors: an accidental change of the contexts or the canonical JSON fails here.
    k = bytes(range(32))
    assert canonical({"b": [1.5, "x"], "a": 1, "c": 1e-05}) == b'{"a":1,"b":[1.5,"x"],"c":1e-05}'
    assert LEDGER_CONTEXT == b"fedseal ledger v2\x00"
    assert mac(k, LEDGER_CONTEXT, {"b": [1.5, "x"], "a": 1}) == (
        "fa4389f356b25cc2ade2f986d4db71d437a645142f23adee06cf8b906fc641ed")
    assert mac(k, COUNTER_CONTEXT, Counter("alpha", 3, "00" * 32, 1.25, 2e-05).body()) == (
        "22849c99da8bbc25f5895b1b67fc0a444e809040d766e39306c1f9128844fd61")


def test_create_record_reopen(path, key):
    led = _open(path, key)
    assert path.is_file() and led.entries == () and led.epsilon_spent() == 0.0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and counter_path(key).is_file()
    assert led.steps_done("run-1") == 0 and not led.has_round("run-1", 1)
    entry = led.record("run-1", 1, 20, 1.5)
    assert (entry.run, entry.round, entry.steps, entry.epsilon, entry.delta) == ("run-1", 1, 20, 1.5, 1e-5)
    led.record("run-1", 2, 40, 2.25)
    again = _open(path, key)
    assert again.steps_done("run-1") == 40 and again.epsilon_spent("run-1") == 2.25
    assert again.has_round("run-1", 2) and not again.has_round("run-2", 2)
    assert [(e.run, e.round, e.steps, e.epsilon) for e in again.entries] == [
        ("run-1", 1, 20, 1.5), ("run-1", 2, 40, 2.25)]
    body = json.loads(path.read_text())
    assert set(body) == {"version", "site", "target_epsilon", "delta", "seq", "entries", "mac"}
    secret = bytes.fromhex(key.read_text().strip().split(":")[1])
    assert body["seq"] == 2
    assert body["mac"] == mac(secret, LEDGER_CONTEXT, {k: v for k, v in body.items() if k != "mac"})


def test_runs_compose_in_epsilon_and_delta(path, key):
    led = _open(path, key)
    led.record("a", 1, 10, 1.0)
    led.record("a", 2, 20, 1.5)
    led.record("b", 1, 10, 2.0, delta=1e-6)
    assert led.epsilon_spent("a") == 1.5 and led.delta_spent("a") == 1e-5
    assert led.epsilon_spent() == pytest.approx(3.5)
    assert led.delta_spent() == pytest.approx(1.1e-5)  # basic composition adds deltas too
    assert led.remaining() == pytest.approx(4.5)


def test_edited_entry_is_detected(path, key):
    _open(path, key).record("r", 1, 20, 7.5)
    body = json.loads(path.read_text())
    body["entries"][0]["epsilon"] = 0.5  # under-report the spend
    path.write_text(json.dumps(body, indent=2))
    with pytest.raises(LedgerError, match="modified or corrupted.*MAC mismatch.*never reset"):
        _open(path, key)
    path.write_bytes(path.read_bytes()[:-10])  # truncated: not JSON at all
    with pytest.raises(LedgerError, match="modified or corrupted"):
        _open(path, key)


def test_a_mac_recomputed_without_the_key_is_refused(path, key, tmp_path):
    """Whoever edits the ledger cannot re-seal it: a MAC under any other key fails."""
    _open(path, key).record("r", 1, 20, 7.5)
    body = json.loads(path.read_text())
    body["entries"][0]["epsilon"] = 0.5
    body["mac"] = mac(b"\x00" * 32, LEDGER_CONTEXT, {k: v for k, v in body.items() if k != "mac"})
    path.write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="MAC mismatch"):
        _open(path, key)


def test_restored_older_copy_is_detected_and_recovered_deliberately(path, key, tmp_path, capsys):
    led = _open(path, key)
    led.record("r", 1, 20, 1.5)
    backup = tmp_path / "backup.json"
    shutil.copy(path, backup)  # the nightly backup of the data folder
    led.record("r", 2, 40, 2.5)
    led.record("other", 1, 10, 1.0)
    shutil.copy(backup, path)  # restored over the latest
    with pytest.raises(LedgerError, match=r"older copy.*write 1.*write 3.*fedseal ledger recover"):
        _open(path, key)
    assert ledger_cli.main(["recover", "--ledger", str(path), "--ledger-key", str(key)]) == 0
    recovered = _open(path, key)
    assert recovered.epsilon_spent() == pytest.approx(3.5)  # nothing forgotten
    assert recovered.delta_spent() == pytest.approx(2e-5)
    assert [e.run for e in recovered.entries][-1].startswith("carried-forward-")
    assert ledger_cli.main(["show", "--ledger", str(path), "--ledger-key", str(key), "--site", "s",
                            "--epsilon", "8", "--delta", "1e-5"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert shown["total"] == {"epsilon": pytest.approx(3.5), "delta": pytest.approx(2e-5)}


def test_deleted_ledger_is_detected_and_recovered_deliberately(path, key):
    _open(path, key).record("r", 1, 20, 2.0)
    path.unlink()
    with pytest.raises(LedgerError, match="is gone.*remembers 1 writes.*epsilon 2.*deleted"):
        _open(path, key)
    with pytest.raises(LedgerError, match="give the site's name"):
        recover(path, key)
    recover(path, key, "s", 8.0, 1e-5)
    assert _open(path, key).epsilon_spent() == pytest.approx(2.0)


def test_missing_key_or_counter_is_refused_never_reset(path, key):
    _open(path, key).record("r", 1, 20, 2.0)
    before = path.read_bytes()
    counter = counter_path(key)
    saved = counter.read_bytes()
    counter.unlink()
    with pytest.raises(LedgerError, match="has no counter"):
        _open(path, key)
    counter.write_bytes(saved)
    key.rename(key.with_name("moved.key"))
    with pytest.raises(LedgerError, match="exists but its key .* does not"):
        _open(path, key)
    assert path.read_bytes() == before and not key.exists()  # no new key was made


def test_edited_counter_is_refused(path, key):
    _open(path, key).record("r", 1, 20, 2.0)
    body = json.loads(counter_path(key).read_text())
    body["seq"] = 0  # pretend fewer writes
    counter_path(key).write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="counter .* was modified"):
        _open(path, key)


def test_a_crash_between_ledger_and_counter_is_accepted(path, key, monkeypatch):
    led = _open(path, key)
    led.record("r", 1, 20, 1.0)
    stale = counter_path(key).read_bytes()
    led.record("r", 2, 40, 2.0)
    counter_path(key).write_bytes(stale)  # as if the counter's write never happened
    again = _open(path, key)
    assert again.epsilon_spent() == 2.0
    assert json.loads(counter_path(key).read_text())["seq"] == again.seq  # caught up


def test_budget_or_site_change_is_refused(path, key):
    _open(path, key)
    with pytest.raises(LedgerError, match="created for epsilon=8.0.*set the node config"):
        _open(path, key, epsilon=16.0)
    with pytest.raises(LedgerError, match="delta=1e-05.*now asks for"):
        _open(path, key, delta=1e-6)
    with pytest.raises(LedgerError, match="belongs to site 's'"):
        _open(path, key, site="t")


def test_missing_folder_is_an_error(tmp_path, key):
    with pytest.raises(LedgerError, match="does not exist"):
        _open(tmp_path / "nope" / "ledger.json", key)


def test_atomic_write_leaves_no_temp_file(path, key, monkeypatch):
    led = _open(path, key)
    led.record("r", 1, 20, 1.0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(LedgerError,
                       match=r"cannot write the privacy ledger .* or its counter \(disk full\)"):
        led.record("r", 2, 40, 2.0)
    assert path.read_bytes() == before  # the old ledger is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    assert not led.has_round("r", 2)  # the failed entry is not kept in memory either


def test_fsync_is_called(path, key, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    _open(path, key).record("r", 1, 1, 0.1)
    assert len(calls) >= 8  # ledger and counter, file and folder, at creation and at the record


def test_duplicate_round_is_not_double_counted(path, key):
    led = _open(path, key)
    led.record("r", 1, 20, 1.5)
    mtime = path.stat().st_mtime_ns
    led.record("r", 1, 20, 1.5)  # identical: a no-op
    assert path.stat().st_mtime_ns == mtime
    assert len(_open(path, key).entries) == 1
    with pytest.raises(LedgerError, match="already in the ledger.*cannot rewrite"):
        led.record("r", 1, 20, 1.7)
    assert led.epsilon_spent() == 1.5


def test_retried_round_counts_its_extra_spend(path, key):
    led = _open(path, key)
    led.record("r", 1, 20, 1.5, noise_multiplier=0.9, sample_rate=0.01)
    led.record("r", 1, 40, 2.1, noise_multiplier=0.9, sample_rate=0.01)  # the server asked again
    reopened = _open(path, key)
    assert [(e.round, e.steps) for e in reopened.entries] == [(1, 20), (1, 40)]
    assert reopened.steps_done("r") == 40 and reopened.epsilon_spent() == 2.1
    assert reopened.plan_of("r") == (0.9, 0.01) and reopened.plan_of("other") is None


def test_cumulative_values_cannot_go_down(path, key):
    led = _open(path, key)
    led.record("r", 1, 20, 1.5)
    with pytest.raises(LedgerError, match="cannot go down"):
        led.record("r", 2, 10, 1.0)
    with pytest.raises(LedgerError, match="finite"):
        led.record("r", 2, 40, float("inf"))


def test_file_changed_behind_our_back_is_refused(path, key):
    first = _open(path, key)
    second = _open(path, key)
    second.record("r", 1, 20, 1.5)
    with pytest.raises(LedgerError, match="changed since it was opened"):
        first.record("r", 2, 40, 2.0)
    assert _open(path, key).steps_done("r") == 20
