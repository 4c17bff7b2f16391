"""What makes a site's privacy ledger trustworthy: a keyed MAC and a monotonic counter.

The ledger (:mod:`fedseal.client.ledger`) lives with the site's data and its
backups. Two things kept *apart* from it, by default in the site's own
secrets folder, make edits, old copies and deletions detectable:

the ledger key (``--ledger-key FILE``)
    32 random bytes made at the site on first use (mode 0600). Every ledger
    file carries an HMAC-SHA256 under it, so an edited entry (or a ledger
    written by anyone without the key) fails verification;
the counter (``FILE.counter`` beside the key)
    made together with the key (:func:`create_seal`, write 0, no ledger
    yet), then the number of the latest ledger write, the MAC of that ledger
    and the site's totals at that moment, itself MACed. A ledger older than
    the counter (a restored backup), a missing ledger (deleted) and a key
    without its counter (the ledger and the counter deleted, the key kept)
    are refused, and the error says how to recover deliberately (``fedseal
    ledger recover``, which carries the counter's totals forward so the
    recorded spend never goes down).

Writes go ledger first, counter second, each atomic; a crash between the two
leaves a ledger exactly one write ahead of its counter, validly MACed, which
only the key holder can produce: it is accepted and the counter catches up.

Byte formats (fixed by known-answer tests in ``tests/test_ledger.py``): a MAC
is ``HMAC-SHA256(key, CONTEXT || canonical JSON)``, where the canonical JSON
has sorted keys, no spaces, ASCII only and no NaN, and ``CONTEXT`` is
:data:`LEDGER_CONTEXT` (a version-2 ledger: :data:`LEDGER_CONTEXTS`) or
:data:`COUNTER_CONTEXT`.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from fedseal.common.durable import atomic_write, fsync_path
from fedseal.common.errors import FedsealError

LEDGER_CONTEXTS = {2: b"fedseal ledger v2\x00", 3: b"fedseal ledger v3\x00"}
"""The MAC context of each ledger file version this fedseal reads."""
LEDGER_CONTEXT = LEDGER_CONTEXTS[3]
COUNTER_CONTEXT = b"fedseal ledger counter v1\x00"
KEY_HEADER = "fedseal-ledger-key-v1:"
KEY_BYTES = 32
COUNTER_SUFFIX = ".counter"


class SealError(FedsealError, RuntimeError):
    """The ledger key or counter is missing, unreadable or does not match."""

    code = "ledger.seal"


def canonical(body: dict[str, Any]) -> bytes:
    """The canonical JSON bytes a MAC covers (sorted keys, no spaces, ASCII, no NaN)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def mac(key: bytes, context: bytes, body: dict[str, Any]) -> str:
    """Hex HMAC-SHA256 under ``key`` of ``context`` followed by the canonical ``body``."""
    return hmac.new(key, context + canonical(body), sha256).hexdigest()


def counter_path(key_path: Path) -> Path:
    """Where the counter of the ledger key at ``key_path`` lives."""
    return key_path.with_name(key_path.name + COUNTER_SUFFIX)


def read_key(path: Path) -> bytes:
    """The ledger key stored at ``path``.

    Raises
    ------
    SealError
        If the file is missing, unreadable or not a fedseal ledger key.
    """
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise SealError(f"the ledger key {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SealError(f"cannot read the ledger key {path}: {exc}") from None
    if not text.startswith(KEY_HEADER):
        raise SealError(f"{path} is not a fedseal ledger key (it must start with {KEY_HEADER})")
    try:
        key = bytes.fromhex(text[len(KEY_HEADER) :])
    except ValueError:
        raise SealError(f"the ledger key {path} is damaged (not hex); restore it") from None
    if len(key) != KEY_BYTES:
        raise SealError(f"the ledger key {path} is damaged ({len(key)} bytes, not {KEY_BYTES})")
    return key


def create_seal(path: Path, site: str) -> bytes:
    """Make a new random ledger key at ``path`` (mode 0600) and its counter; never overwrites one.

    The counter is written right after the key, saying write 0 and no ledger
    yet, so a key without a counter always means that the counter was lost
    (deleted, or a crash between the two writes), never a site's first use.
    """
    if not path.parent.is_dir():
        raise SealError(f"cannot create the ledger key {path}: folder {path.parent} does not exist")
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SealError(f"the ledger key {path} appeared while it was being created") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(KEY_HEADER + key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_path(path.parent)
    write_counter(counter_path(path), key, Counter(site, 0, "", 0.0, 0.0))
    return key


@dataclass(frozen=True)
class Counter:
    """The counter's content: the latest ledger write and the site's spend then.

    ``seq`` 0 with an empty ``ledger_mac`` is a counter made with its key,
    before any ledger was written.
    """

    site: str
    seq: int
    ledger_mac: str
    epsilon: float
    delta: float

    def body(self) -> dict[str, Any]:
        """The MACed fields."""
        return {
            "version": 1,
            "site": self.site,
            "seq": self.seq,
            "ledger_mac": self.ledger_mac,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }


def read_counter(path: Path, key: bytes) -> Counter | None:
    """The counter at ``path`` (None if there is none), its MAC checked under ``key``."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SealError(f"the ledger counter {path} is unreadable ({exc})") from None
    try:
        counter = Counter(
            site=str(raw["site"]),
            seq=int(raw["seq"]),
            ledger_mac=str(raw["ledger_mac"]),
            epsilon=float(raw["epsilon"]),
            delta=float(raw["delta"]),
        )
        good = hmac.compare_digest(str(raw["mac"]), mac(key, COUNTER_CONTEXT, counter.body()))
    except (KeyError, TypeError, ValueError):
        good = False
    if not good:
        raise SealError(
            f"the ledger counter {path} was modified or does not belong to this "
            "ledger key; restore both from where you keep them"
        )
    return counter


def write_counter(path: Path, key: bytes, counter: Counter) -> None:
    """Write ``counter`` atomically with its MAC."""
    body = counter.body()
    body["mac"] = mac(key, COUNTER_CONTEXT, counter.body())
    atomic_write(path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8"))


__all__ = [
    "COUNTER_CONTEXT",
    "Counter",
    "KEY_HEADER",
    "LEDGER_CONTEXT",
    "LEDGER_CONTEXTS",
    "SealError",
    "canonical",
    "counter_path",
    "create_seal",
    "mac",
    "read_counter",
    "read_key",
    "write_counter",
]
