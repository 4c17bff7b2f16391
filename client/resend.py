"""The site's last update, kept on disk so a repeated round costs no privacy.

If the server crashes after a site trained round ``r`` but before the round
completed, the restarted server asks for round ``r`` again, with the same global
weights. Training again would spend budget a second time. Instead the site
answers with the update it already computed: sending the same DP output again
is post-processing and spends nothing. (With secure aggregation the masks are
fresh every time; only the update inside them is reused.)

The file lives beside the ledger (``<ledger-path>.update``), at the site only.
It is written atomically *before* the ledger records the round, so after a
crash either both exist, or the file exists without the ledger entry (the
update never left; it is reused and then recorded), or neither.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from common.durable import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedUpdate:
    """One round's weighted update and what the ledger records for it."""

    job: str
    round: int
    global_digest: str
    update: dict[str, np.ndarray]
    weight: float
    steps: int  # cumulative in the job, as in the ledger
    epsilon: float  # the job's cumulative epsilon, as in the ledger
    noise_multiplier: float
    sample_rate: float


def resend_path(ledger_path: Path) -> Path:
    """Where the update cache of the ledger at ``ledger_path`` lives."""
    return ledger_path.with_name(ledger_path.name + ".update")


def save_update(path: Path, saved: SavedUpdate) -> None:
    """Write ``saved`` atomically, replacing the previous round's."""
    meta = {"job": saved.job, "round": saved.round, "global_digest": saved.global_digest,
            "weight": saved.weight, "steps": saved.steps, "epsilon": saved.epsilon,
            "noise_multiplier": saved.noise_multiplier, "sample_rate": saved.sample_rate}
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in saved.update.items()}
    atomic_write(path, save(tensors, metadata={"fedseal": json.dumps(meta)}))


def load_update(path: Path, job: str, round: int, global_digest: str) -> SavedUpdate | None:
    """The saved update if it answers exactly this round of this job from these weights."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = json.loads(fh.metadata()["fedseal"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        saved = SavedUpdate(job=str(meta["job"]), round=int(meta["round"]),
                            global_digest=str(meta["global_digest"]), update=dict(tensors),
                            weight=float(meta["weight"]), steps=int(meta["steps"]),
                            epsilon=float(meta["epsilon"]),
                            noise_multiplier=float(meta["noise_multiplier"]),
                            sample_rate=float(meta["sample_rate"]))
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable update cache %s (%s); the round is trained afresh",
                    path, exc)
        return None
    if (saved.job, saved.round, saved.global_digest) != (str(job), int(round), global_digest):
        return None
    return saved


__all__ = ["SavedUpdate", "load_update", "resend_path", "save_update"]
