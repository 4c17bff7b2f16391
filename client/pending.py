"""A trained round's update while it has not left the site.

With secure aggregation, the ``train`` reply carries only fresh public keys;
the update leaves the site later, masked, in the masked-input stage. If the
server dies in between and asks for the same round again (same job, round and
global weights), the update never left in any form, so answering with it under
fresh keys and masks spends nothing and reveals nothing new. The site keeps it
here (``<ledger-path>.pending``, at the site only) until it leaves:
:func:`release` deletes it *before* the masked input is sent. From then on a
repeated ``train`` of that round finds no pending update, and is trained
afresh with new, recorded spend if the budget allows, or refused: answering
twice with the same update would let a server subtract two sums over different
survivors and read it. A plain (unmasked) update leaves with the ``train``
reply and is never kept.

Ordering: the file is written atomically *before* the ledger records the
round; after a crash either both exist, or the file exists without the ledger
entry (the update never left; it is reused and then recorded), or neither.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from fedseal.common.durable import atomic_write, fsync_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingUpdate:
    """One round's weighted update that has not left the site, and what the ledger records for it."""

    job: str
    round: int
    global_digest: str
    update: dict[str, np.ndarray]
    weight: float
    steps: int  # cumulative in the job, as in the ledger
    epsilon: float  # the job's cumulative epsilon, as in the ledger
    noise_multiplier: float
    sample_rate: float


def pending_path(ledger_path: Path) -> Path:
    """Where the pending update of the ledger at ``ledger_path`` lives."""
    return ledger_path.with_name(ledger_path.name + ".pending")


def hold(path: Path, pending: PendingUpdate) -> None:
    """Write ``pending`` atomically, replacing any earlier round's."""
    meta = {
        "job": pending.job,
        "round": pending.round,
        "global_digest": pending.global_digest,
        "weight": pending.weight,
        "steps": pending.steps,
        "epsilon": pending.epsilon,
        "noise_multiplier": pending.noise_multiplier,
        "sample_rate": pending.sample_rate,
    }
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in pending.update.items()}
    atomic_write(path, save(tensors, metadata={"fedseal": json.dumps(meta)}))


def held(path: Path, job: str, round: int, global_digest: str) -> PendingUpdate | None:
    """The pending update if it answers exactly this round of this job from these weights."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = json.loads(fh.metadata()["fedseal"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        pending = PendingUpdate(
            job=str(meta["job"]),
            round=int(meta["round"]),
            global_digest=str(meta["global_digest"]),
            update=dict(tensors),
            weight=float(meta["weight"]),
            steps=int(meta["steps"]),
            epsilon=float(meta["epsilon"]),
            noise_multiplier=float(meta["noise_multiplier"]),
            sample_rate=float(meta["sample_rate"]),
        )
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable pending update %s (%s); the round is trained afresh", path, exc)
        return None
    if (pending.job, pending.round, pending.global_digest) != (str(job), int(round), global_digest):
        return None
    return pending


def release(path: Path) -> None:
    """Forget the pending update, durably, before it leaves the site (masked)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_path(path.parent)


__all__ = ["PendingUpdate", "held", "hold", "pending_path", "release"]
