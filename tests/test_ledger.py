"""The privacy ledger: MACed under a site key, checked against a counter, atomic, never
double-counts a round; edits, older copies and deletions are refused; recovery keeps spend;
the total is raised only on purpose; grants and spend never pass the total."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from fedseal.client import ledger as ledger_module
from fedseal.client import ledger_cli
from fedseal.client.ledger import Budget, LedgerError, PrivacyLedger, recover
from fedseal.client.ledger_seal import (
    COUNTER_CONTEXT,
    KEY_HEADER,
    LEDGER_CONTEXT,
    LEDGER_CONTEXTS,
    Counter,
    canonical,
    counter_path,
    mac,
    write_counter,
)
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


def _granted(path, key, *jobs, epsilon=2.0, delta=2e-6):
    """The ledger, opened, with a grant of ``(epsilon, delta)`` for each of ``jobs``."""
    led = _open(path, key)
    for job in jobs:
        led.record_grant(job, epsilon, delta, 1e-5)
    return led


def test_mac_byte_formats_known_answers():
    # Fixed vectors: an accidental change of the contexts or the canonical JSON fails here.
    k = bytes(range(32))
    assert canonical({"b": [1.5, "x"], "a": 1, "c": 1e-05}) == b'{"a":1,"b":[1.5,"x"],"c":1e-05}'
    assert LEDGER_CONTEXTS == {2: b"fedseal ledger v2\x00", 3: b"fedseal ledger v3\x00"}
    assert LEDGER_CONTEXT == LEDGER_CONTEXTS[3]
    assert mac(k, LEDGER_CONTEXTS[2], {"b": [1.5, "x"], "a": 1}) == (
        "fa4389f356b25cc2ade2f986d4db71d437a645142f23adee06cf8b906fc641ed"
    )
    assert mac(k, LEDGER_CONTEXT, {"b": [1.5, "x"], "a": 1}) == (
        "c88e925a1e552d59700a1f3d382522992627925aa34f7f1981b9e8f9216e43d9"
    )
    assert mac(k, COUNTER_CONTEXT, Counter("alpha", 3, "00" * 32, 1.25, 2e-05).body()) == (
        "22849c99da8bbc25f5895b1b67fc0a444e809040d766e39306c1f9128844fd61"
    )


# A version-3 ledger as fedseal writes it (key bytes(range(32)), every time 2026-01-02T03:04:05):
# created for epsilon 8, delta 1e-5; job-a granted (2, 2.5e-6); its round 1 recorded; the total
# raised to 16 by dana.
V3_FILE = """{
  "entries": [
    {
      "delta": 2.5e-06,
      "epsilon": 1.5,
      "noise_multiplier": 0.9,
      "round": 1,
      "run": "job-a",
      "sample_rate": 0.01,
      "steps": 20,
      "time": "2026-01-02T03:04:05+00:00"
    }
  ],
  "grants": [
    {
      "asked_delta": 1e-05,
      "delta": 2.5e-06,
      "epsilon": 2.0,
      "job": "job-a",
      "time": "2026-01-02T03:04:05+00:00"
    }
  ],
  "mac": "bdb4e6a3e557f7ef0898245ffe285c6073ced77af3eefdfbe7a5d97574995b1d",
  "raises": [
    {
      "by": "dana",
      "new": {
        "delta": 1e-05,
        "epsilon": 16.0
      },
      "old": {
        "delta": 1e-05,
        "epsilon": 8.0
      },
      "reason": "second study",
      "time": "2026-01-02T03:04:05+00:00"
    }
  ],
  "seq": 4,
  "site": "alpha",
  "total": {
    "delta": 1e-05,
    "epsilon": 16.0
  },
  "version": 3
}
"""

# A version-2 ledger and its counter, as fedseal 2 (main at a08d6fb) wrote them under the same key:
# two jobs, each with a whole delta of 1e-5 against a budget of epsilon 8, delta 1e-5.
V2_FILE = {
    "delta": 1e-05,
    "entries": [
        {
            "delta": 1e-05,
            "epsilon": 1.5,
            "noise_multiplier": 0.9,
            "round": 1,
            "run": "job-a",
            "sample_rate": 0.01,
            "steps": 20,
            "time": "2026-12-04T15:43:11+00:00",
        },
        {
            "delta": 1e-05,
            "epsilon": 2.25,
            "noise_multiplier": 0.9,
            "round": 2,
            "run": "job-a",
            "sample_rate": 0.01,
            "steps": 40,
            "time": "2026-12-04T15:43:11+00:00",
        },
        {
            "delta": 1e-05,
            "epsilon": 3.0,
            "noise_multiplier": 1.1,
            "round": 1,
            "run": "job-b",
            "sample_rate": 0.02,
            "steps": 10,
            "time": "2026-12-04T15:43:11+00:00",
        },
    ],
    "mac": "9296cf337c86d3859c0b16c76d88aa55e6c22bcbba3eadd3008682503164e1a1",
    "seq": 3,
    "site": "alpha",
    "target_epsilon": 8.0,
    "version": 2,
}
V2_COUNTER = {
    "delta": 2e-05,
    "epsilon": 5.25,
    "ledger_mac": "9296cf337c86d3859c0b16c76d88aa55e6c22bcbba3eadd3008682503164e1a1",
    "mac": "c16170fd6f70b027b4776e5e09c4ef056cbf3d46fdc134ca70fe7c24258567d2",
    "seq": 3,
    "site": "alpha",
    "version": 1,
}


def _known_key(key):
    key.write_text(KEY_HEADER + bytes(range(32)).hex() + "\n")


def test_version_3_file_format_known_answer(path, key, monkeypatch):
    """The bytes fedseal writes: an accidental change of a field, its name or the MAC fails here."""
    _known_key(key)
    write_counter(counter_path(key), bytes(range(32)), Counter("alpha", 0, "", 0.0, 0.0))
    monkeypatch.setattr(ledger_module, "_now", lambda: "2026-01-02T03:04:05+00:00")
    led = _open(path, key, site="alpha")
    led.record_grant("job-a", 2.0, 2.5e-06, 1e-05)
    led.record("job-a", 1, 20, 1.5, noise_multiplier=0.9, sample_rate=0.01)
    led.raise_total(16.0, 1e-05, "dana", "second study")
    assert path.read_text() == V3_FILE
    again = _open(path, key, site="alpha", epsilon=16.0)
    assert (again.total, again.grants, again.raises) == (led.total, led.grants, led.raises)


def test_a_version_2_ledger_is_read_and_written_as_version_3(path, key):
    """Its jobs hold what they spent (here two whole deltas, over the total delta: nothing is
    left for new jobs until the total is raised); a raise writes it as version 3."""
    _known_key(key)
    path.write_text(json.dumps(V2_FILE))
    counter_path(key).write_text(json.dumps(V2_COUNTER))
    led = _open(path, key, site="alpha")
    assert led.spent() == led.held() == Budget(5.25, 2e-5) and led.grants == ()
    assert led.remaining().epsilon == pytest.approx(2.75) and led.remaining().delta < 0
    with pytest.raises(LedgerError, match="has rounds .* but no grant.*start a new run"):
        led.record_grant("job-a", 1.0, 1e-6, 1e-5)  # a version-2 job cannot go on
    with pytest.raises(LedgerError, match="over its total epsilon 8, delta 1e-05"):
        led.record_grant("job-c", 1.0, 1e-6, 1e-5)
    led.raise_total(8.0, 3e-5, "dana", "the version-2 jobs added a whole delta each")
    body = json.loads(path.read_text())
    assert body["version"] == 3 and body["seq"] == 4 and len(body["entries"]) == 3
    again = _open(path, key, site="alpha", delta=3e-5)
    assert again.remaining() == Budget(pytest.approx(2.75), pytest.approx(1e-5))
    assert again.record_grant("job-c", 1.0, 1e-6, 1e-5).job == "job-c"


def test_an_unknown_version_says_to_upgrade(path, key):
    _open(path, key)
    body = json.loads(path.read_text())
    path.write_text(json.dumps({**body, "version": 4}))
    with pytest.raises(LedgerError, match="version 4; this fedseal reads versions 2, 3: upgrade"):
        _open(path, key)


def test_create_record_reopen(path, key):
    led = _open(path, key)
    assert path.is_file() and led.entries == () and led.epsilon_spent() == 0.0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and counter_path(key).is_file()
    assert led.steps_done("run-1") == 0 and not led.has_round("run-1", 1)
    led.record_grant("run-1", 3.0, 4e-6, 1e-5)
    entry = led.record("run-1", 1, 20, 1.5)
    assert (entry.run, entry.round, entry.steps, entry.epsilon, entry.delta) == ("run-1", 1, 20, 1.5, 4e-6)
    led.record("run-1", 2, 40, 2.25)
    again = _open(path, key)
    assert again.steps_done("run-1") == 40 and again.epsilon_spent("run-1") == 2.25
    assert again.has_round("run-1", 2) and not again.has_round("run-2", 2)
    assert [(e.run, e.round, e.steps, e.epsilon) for e in again.entries] == [
        ("run-1", 1, 20, 1.5),
        ("run-1", 2, 40, 2.25),
    ]
    assert again.grant_of("run-1").epsilon == 3.0 and again.grant_of("run-2") is None
    body = json.loads(path.read_text())
    assert set(body) == {"version", "site", "total", "seq", "raises", "grants", "entries", "mac"}
    secret = bytes.fromhex(key.read_text().strip().split(":")[1])
    assert body["seq"] == 4  # created (1), granted (2), two rounds (3, 4)
    assert body["mac"] == mac(secret, LEDGER_CONTEXT, {k: v for k, v in body.items() if k != "mac"})


def test_jobs_compose_in_epsilon_and_delta_and_hold_their_grants(path, key):
    led = _open(path, key)
    led.record_grant("a", 2.0, 3e-6, 1e-5)
    led.record_grant("b", 2.0, 1e-6, 1e-5)
    led.record("a", 1, 10, 1.0)
    led.record("a", 2, 20, 1.5)
    led.record("b", 1, 10, 2.0)
    assert led.spent("a") == Budget(1.5, 3e-6) and led.spent("b") == Budget(2.0, 1e-6)
    assert led.epsilon_spent() == pytest.approx(3.5)
    assert led.delta_spent() == pytest.approx(4e-6)  # basic composition adds deltas too
    assert led.held() == Budget(pytest.approx(4.0), pytest.approx(4e-6))  # a's grant, not spend
    assert led.remaining() == Budget(pytest.approx(4.0), pytest.approx(6e-6))


def test_grants_and_records_never_pass_the_total_or_the_grant(path, key):
    led = _open(path, key)
    led.record_grant("a", 6.0, 5e-6, 1e-5)
    with pytest.raises(LedgerError, match="granting job b epsilon 3.*over its total epsilon 8"):
        led.record_grant("b", 3.0, 1e-6, 1e-5)  # epsilon over
    with pytest.raises(LedgerError, match="granting job b .*delta 6e-06.*over its total"):
        led.record_grant("b", 1.0, 6e-6, 1e-5)  # delta over
    with pytest.raises(LedgerError, match="job a already has a grant in .*; a grant is never recomputed"):
        led.record_grant("a", 1.0, 1e-6, 1e-5)
    with pytest.raises(LedgerError, match="job c has no grant"):
        led.record("c", 1, 10, 0.5)
    with pytest.raises(LedgerError, match="epsilon to 6.5, over its grant of 6"):
        led.record("a", 1, 10, 6.5)
    with pytest.raises(LedgerError, match="not 1 to 64 printable"):
        led.record_grant("job\nid", 1.0, 1e-6, 1e-5)
    assert len(_open(path, key).grants) == 1 and _open(path, key).entries == ()


def test_the_total_is_raised_only_on_purpose_and_the_raise_is_recorded(path, key, capsys):
    led = _granted(path, key, "a", epsilon=8.0, delta=1e-5)
    with pytest.raises(
        LedgerError,
        match="holds the site's total budget epsilon 8, delta 1e-05, "
        "but this site was started with epsilon 16.*fedseal "
        "ledger raise --ledger .* --epsilon 16 --delta 1e-05",
    ):
        _open(path, key, epsilon=16.0)
    with pytest.raises(LedgerError, match="give --by NAME and --reason TEXT"):
        led.raise_total(16.0, 1e-5, "", "why")
    with pytest.raises(LedgerError, match="must not lower either"):
        led.raise_total(16.0, 1e-6, "dana", "more epsilon")
    assert (
        ledger_cli.main(
            [
                "raise",
                "--ledger",
                str(path),
                "--ledger-key",
                str(key),
                "--epsilon",
                "16",
                "--by",
                "dana",
                "--reason",
                "second study",
            ]
        )
        == 0
    )
    assert "restart fedseal client with --epsilon 16 --delta 1e-05" in capsys.readouterr().out
    with pytest.raises(
        LedgerError,
        match=r"raised on .* by dana\), but this site was started "
        "with epsilon 8.*Start it with --epsilon 16",
    ):
        _open(path, key)
    led = _open(path, key, epsilon=16.0)
    [raised] = led.raises
    assert (raised.by, raised.reason, raised.old, raised.new) == (
        "dana",
        "second study",
        Budget(8.0, 1e-5),
        Budget(16.0, 1e-5),
    )
    # the epsilon is raised, the delta is not: the job that held it all keeps it
    assert led.remaining() == Budget(8.0, 0.0) and led.grant_of("a").epsilon == 8.0
    with pytest.raises(LedgerError, match="never lowered"):
        _open(path, key, epsilon=8.0)


def test_show_prints_jobs_raises_and_what_is_left(path, key, capsys):
    led = _granted(path, key, "job-a", epsilon=2.0, delta=2.5e-6)
    led.record("job-a", 1, 20, 1.25)
    led.record("job-a", 2, 40, 1.75)
    led.raise_total(12.0, 1e-5, "dana", "second study")
    capsys.readouterr()
    assert ledger_cli.main(["show", "--ledger", str(path), "--ledger-key", str(key)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == [
        "job",
        "rounds",
        "granted",
        "eps",
        "granted",
        "delta",
        "spent",
        "eps",
        "spent",
        "delta",
        "last",
    ]
    assert lines[3].split()[:6] == ["job-a", "2", "2", "2.5e-06", "1.75", "2.5e-06"]
    assert any(line.startswith("raised ") and "by dana: epsilon 8 -> 12" in line for line in lines)
    assert "remaining:    epsilon 10, delta 7.5e-06" in lines
    assert ledger_cli.main(["show", "--ledger", str(path), "--ledger-key", str(key), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["total"] == {"epsilon": 12.0, "delta": 1e-5}
    assert shown["spent"] == {"epsilon": 1.75, "delta": 2.5e-6}
    assert shown["remaining"] == {"epsilon": 10.0, "delta": pytest.approx(7.5e-6)}
    [job] = shown["jobs"]
    assert (job["job"], job["rounds"], job["steps"], job["granted"]) == (
        "job-a",
        2,
        40,
        {"epsilon": 2.0, "delta": 2.5e-6},
    )
    assert [r["by"] for r in shown["raises"]] == ["dana"]
    with pytest.raises(SystemExit):
        ledger_cli.main(["show", "--ledger", str(path), "--ledger-key", str(key), "--epsilon", "8"])
    assert "show does not take --epsilon" in capsys.readouterr().err


def test_edited_entry_is_detected(path, key):
    _granted(path, key, "r", epsilon=8.0).record("r", 1, 20, 7.5)
    body = json.loads(path.read_text())
    body["entries"][0]["epsilon"] = 0.5  # under-report the spend
    path.write_text(json.dumps(body, indent=2))
    with pytest.raises(LedgerError, match="modified or corrupted.*MAC mismatch.*never reset"):
        _open(path, key)
    path.write_bytes(path.read_bytes()[:-10])  # truncated: not JSON at all
    with pytest.raises(LedgerError, match="modified or corrupted"):
        _open(path, key)


@pytest.mark.parametrize("edit", ["entry", "grant", "raise"])
def test_a_mac_recomputed_without_the_key_is_refused(path, key, edit):
    """Whoever edits the ledger cannot re-seal it: a MAC under any other key fails."""
    led = _granted(path, key, "r", epsilon=8.0)
    led.record("r", 1, 20, 7.5)
    led.raise_total(9.0, 1e-5, "dana", "why")
    body = json.loads(path.read_text())
    if edit == "entry":
        body["entries"][0]["epsilon"] = 0.5
    elif edit == "grant":
        body["grants"][0]["delta"] = 1e-9  # give delta back
    else:
        body["raises"][0]["by"] = "someone else"
    body["mac"] = mac(b"\x00" * 32, LEDGER_CONTEXT, {k: v for k, v in body.items() if k != "mac"})
    path.write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="MAC mismatch"):
        _open(path, key, epsilon=9.0)


def test_restored_older_copy_is_detected_and_recovered_deliberately(path, key, tmp_path, capsys):
    led = _granted(path, key, "r", "other")
    led.record("r", 1, 20, 1.5)
    backup = tmp_path / "backup.json"
    shutil.copy(path, backup)  # the nightly backup of the data folder
    led.record("r", 2, 40, 2.0)
    led.record("other", 1, 10, 1.0)
    shutil.copy(backup, path)  # restored over the latest
    with pytest.raises(LedgerError, match=r"older copy.*write 4.*write 6.*fedseal ledger recover"):
        _open(path, key)
    assert ledger_cli.main(["recover", "--ledger", str(path), "--ledger-key", str(key)]) == 0
    recovered = _open(path, key)
    assert recovered.epsilon_spent() == pytest.approx(3.0)  # nothing forgotten
    assert recovered.delta_spent() == pytest.approx(4e-6)
    assert [e.run for e in recovered.entries][-1].startswith("carried-forward-")
    # what the jobs hold: both grants, and the carried-forward spend on top
    assert recovered.held() == Budget(pytest.approx(4.0 + 1.5), pytest.approx(4e-6 + 2e-6))
    capsys.readouterr()
    assert ledger_cli.main(["show", "--ledger", str(path), "--ledger-key", str(key), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["spent"] == {"epsilon": pytest.approx(3.0), "delta": pytest.approx(4e-6)}


def test_deleted_ledger_is_detected_and_recovered_deliberately(path, key):
    _granted(path, key, "r").record("r", 1, 20, 2.0)
    path.unlink()
    with pytest.raises(LedgerError, match="is gone.*remembers 3 writes.*epsilon 2.*deleted"):
        _open(path, key)
    with pytest.raises(LedgerError, match="give the site's name"):
        recover(path, key)
    recover(path, key, "s", 8.0, 1e-5)
    assert _open(path, key).epsilon_spent() == pytest.approx(2.0)


def test_missing_key_or_counter_is_refused_never_reset(path, key):
    _granted(path, key, "r").record("r", 1, 20, 2.0)
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


def test_ledger_and_counter_deleted_with_the_key_kept_is_refused(path, key, capsys):
    """The reset docs/deploy.md says is refused: spend 2, delete ledger and counter, keep the key."""
    _granted(path, key, "r").record("r", 1, 20, 2.0)
    path.unlink()
    counter_path(key).unlink()
    for _ in range(2):  # and stays refused: nothing was made by the refusal
        with pytest.raises(
            LedgerError,
            match="key .* is there but its counter .* and the ledger .* are not.*would forget the spend",
        ):
            _open(path, key)
    assert not path.exists() and not counter_path(key).exists()
    assert ledger_cli.main(["show", "--ledger", str(path), "--ledger-key", str(key)]) == 2
    assert "are not" in capsys.readouterr().err
    # the operator decides, on purpose, that this key never had a ledger
    assert (
        ledger_cli.main(
            [
                "recover",
                "--ledger",
                str(path),
                "--ledger-key",
                str(key),
                "--site",
                "s",
                "--epsilon",
                "8",
                "--delta",
                "1e-5",
            ]
        )
        == 0
    )
    assert _open(path, key).entries == ()


def test_a_new_key_comes_with_its_counter(tmp_path, key):
    """A site's first start makes the key and its counter together, before any ledger: a
    start that fails after them (the ledger's folder missing) is no first use on the next."""
    path = tmp_path / "later" / "ledger.json"
    with pytest.raises(LedgerError, match="folder .*later does not exist"):
        _open(path, key)
    counter = json.loads(counter_path(key).read_text())
    assert (counter["site"], counter["seq"], counter["ledger_mac"]) == ("s", 0, "")
    path.parent.mkdir()
    assert _open(path, key).seq == 1
    path.unlink()
    counter_path(key).write_text("")  # unreadable, not missing
    with pytest.raises(LedgerError, match="counter .* is unreadable"):
        _open(path, key)


def test_edited_counter_is_refused(path, key):
    _granted(path, key, "r").record("r", 1, 20, 2.0)
    body = json.loads(counter_path(key).read_text())
    body["seq"] = 0  # pretend fewer writes
    counter_path(key).write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="counter .* was modified"):
        _open(path, key)


def test_a_crash_between_ledger_and_counter_is_accepted(path, key, monkeypatch):
    led = _granted(path, key, "r")
    led.record("r", 1, 20, 1.0)
    stale = counter_path(key).read_bytes()
    led.record("r", 2, 40, 2.0)
    counter_path(key).write_bytes(stale)  # as if the counter's write never happened
    again = _open(path, key)
    assert again.epsilon_spent() == 2.0
    assert json.loads(counter_path(key).read_text())["seq"] == again.seq  # caught up


def test_budget_or_site_change_is_refused(path, key):
    _open(path, key)
    with pytest.raises(LedgerError) as error:
        _open(path, key, epsilon=16.0)
    assert "fedseal ledger raise" in str(error.value) and "node config" not in str(error.value)
    with pytest.raises(
        LedgerError, match="delta 1e-05, but this site was started with epsilon 8, delta 1e-06.*never lowered"
    ):
        _open(path, key, delta=1e-6)
    with pytest.raises(LedgerError, match="belongs to site 's'"):
        _open(path, key, site="t")


def test_missing_folder_is_an_error(tmp_path, key):
    with pytest.raises(LedgerError, match="does not exist"):
        _open(tmp_path / "nope" / "ledger.json", key)


def test_atomic_write_leaves_no_temp_file(path, key, monkeypatch):
    led = _granted(path, key, "r")
    led.record("r", 1, 20, 1.0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(LedgerError, match=r"cannot write the privacy ledger .* or its counter \(disk full\)"):
        led.record("r", 2, 40, 2.0)
    with pytest.raises(LedgerError, match="disk full"):
        led.record_grant("q", 1.0, 1e-6, 1e-5)
    with pytest.raises(LedgerError, match="disk full"):
        led.raise_total(9.0, 1e-5, "dana", "why")
    assert path.read_bytes() == before  # the old ledger is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    # the failed changes are not kept in memory either
    assert not led.has_round("r", 2) and led.grant_of("q") is None and led.raises == ()
    assert led.total == Budget(8.0, 1e-5)


def test_fsync_is_called(path, key, monkeypatch):
    led = _granted(path, key, "r")
    calls = []
    real = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    led.record("r", 1, 1, 0.1)
    assert len(calls) >= 4  # ledger and counter, file and folder


def test_duplicate_round_is_not_double_counted(path, key):
    led = _granted(path, key, "r")
    led.record("r", 1, 20, 1.5)
    mtime = path.stat().st_mtime_ns
    led.record("r", 1, 20, 1.5)  # identical: a no-op
    assert path.stat().st_mtime_ns == mtime
    assert len(_open(path, key).entries) == 1
    with pytest.raises(LedgerError, match="already in the ledger.*cannot rewrite"):
        led.record("r", 1, 20, 1.7)
    assert led.epsilon_spent() == 1.5


def test_retried_round_counts_its_extra_spend(path, key):
    led = _granted(path, key, "r")
    led.record("r", 1, 20, 1.5, noise_multiplier=0.9, sample_rate=0.01)
    led.record("r", 1, 40, 2.0, noise_multiplier=0.9, sample_rate=0.01)  # the server asked again
    reopened = _open(path, key)
    assert [(e.round, e.steps) for e in reopened.entries] == [(1, 20), (1, 40)]
    assert reopened.steps_done("r") == 40 and reopened.epsilon_spent() == 2.0
    assert reopened.plan_of("r") == (0.9, 0.01) and reopened.plan_of("other") is None


def test_cumulative_values_cannot_go_down(path, key):
    led = _granted(path, key, "r")
    led.record("r", 1, 20, 1.5)
    with pytest.raises(LedgerError, match="cannot go down"):
        led.record("r", 2, 10, 1.0)
    with pytest.raises(LedgerError, match="finite"):
        led.record("r", 2, 40, float("inf"))


def test_file_changed_behind_our_back_is_refused(path, key):
    _granted(path, key, "r")
    first = _open(path, key)
    second = _open(path, key)
    second.record("r", 1, 20, 1.5)
    with pytest.raises(LedgerError, match="changed since it was opened"):
        first.record("r", 2, 40, 2.0)
    with pytest.raises(LedgerError, match="changed since it was opened"):
        first.record_grant("q", 1.0, 1e-6, 1e-5)
    assert _open(path, key).steps_done("r") == 20
