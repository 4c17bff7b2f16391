"""The server's checkpoint after each round, so a run can resume after a crash.

A checkpoint folder holds two kinds of files::

    weights-round-0003-<hash>.safetensors   global weights ("w/" + name) and the
                                            strategy's state ("s/" + name)
    checkpoint.json                         round, config, metrics rows, and the
                                            name and SHA-256 of the tensors file

:func:`save_checkpoint` writes the tensors under a new name first and
``checkpoint.json`` last, each atomically (temporary file, fsync,
``os.replace``, fsync of the folder); only then are older tensor files deleted.
``checkpoint.json`` is the commit point: a crash at any moment leaves either the
previous checkpoint intact (its JSON still names its own tensors file) or the
new one, never a JSON naming tensors of another round. The tensors file's name
includes its hash, so rewriting a round never replaces the file the current
JSON names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedseal.common.durable import fsync_path
from fedseal.common.errors import FedsealError

log = logging.getLogger("fedseal")

VERSION = 1
MANIFEST = "checkpoint.json"
WEIGHTS_PREFIX = "w/"
STATE_PREFIX = "s/"
_TENSORS = re.compile(r"^weights-round-\d{4,}-[0-9a-f]{12}\.safetensors$")

# Settings that may change between a run and its resumption.
IGNORED_KEYS = ("out", "timeout", "device", "eval_batch_size", "tensorboard")
# Settings that may grow (a run can be extended by more rounds).
GROWABLE_KEYS = ("rounds",)
# Settings added after checkpoints were first written, with the value that
# reproduces what a checkpoint without them did: a run resumes with it set so.
INTRODUCED_KEYS = {"aggregation": "mean"}


class CheckpointError(FedsealError, RuntimeError):
    """A checkpoint is corrupt, incomplete, or does not match the run that would resume it."""

    code = "checkpoint.error"


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to resume a run after ``round``."""

    round: int
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    config: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tmp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _tensors(
    weights: Mapping[str, np.ndarray], strategy_state: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for prefix, group, what in (
        (WEIGHTS_PREFIX, weights, "weights"),
        (STATE_PREFIX, strategy_state, "strategy_state"),
    ):
        for name, value in group.items():
            array = np.asarray(value)
            if array.dtype == object:
                raise CheckpointError(
                    f"{what}[{name!r}] is not a numeric array; checkpoints store numpy arrays only"
                )
            out[prefix + str(name)] = np.ascontiguousarray(array)
    return out


def save_checkpoint(
    directory: str | Path,
    round: int,
    weights: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    metrics_rows: list[dict[str, Any]],
    config: Mapping[str, Any],
) -> Path:
    """Write the checkpoint after ``round`` to ``directory``; return the manifest's path.

    Parameters
    ----------
    directory
        Checkpoint folder (created if missing).
    round
        The last completed round.
    weights, strategy_state
        Global trainable weights and the strategy's arrays (e.g. FedAdam's
        moments; empty for FedAvg).
    metrics_rows
        The rows of every completed round (JSON-serialisable).
    config
        The run's configuration (``FedConfig.to_dict()``).

    Raises
    ------
    CheckpointError
        If an array is not numeric or the metrics/config are not JSON-serialisable.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise CheckpointError(f"round must be a non-negative integer, got {round!r}")
    try:
        manifest_body = {
            "version": VERSION,
            "round": round,
            "config": dict(config),
            "metrics": list(metrics_rows),
        }
        json.dumps(manifest_body)  # fail before writing anything
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config or metrics are not JSON-serialisable: {exc}") from None
    tensors = _tensors(weights, strategy_state)

    # 1. The tensors, under a temporary name, then under their final (hash-bearing) name.
    tmp = _tmp_path(directory, "weights")
    try:
        save_file(
            tensors, str(tmp), metadata={"format": f"fedseal-checkpoint-{VERSION}", "round": str(round)}
        )
        fsync_path(tmp)
        sha = _sha256(tmp)
        name = f"weights-round-{round:04d}-{sha[:12]}.safetensors"
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(directory)

    # 2. The manifest: the commit point.
    manifest_body.update({"weights_file": name, "sha256": sha})
    manifest = directory / MANIFEST
    tmp = _tmp_path(directory, MANIFEST)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(manifest_body, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, manifest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(directory)

    # 3. Only now forget older tensors (and leftovers of interrupted saves).
    for path in directory.iterdir():
        stale_tensors = _TENSORS.match(path.name) and path.name != name
        leftover = path.name.startswith((".weights.", f".{MANIFEST}.")) and path.name.endswith(".tmp")
        if stale_tensors or leftover:
            path.unlink(missing_ok=True)
    log.debug("checkpoint of round %d written to %s (%s)", round, directory, name)
    return manifest


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none.

    Raises
    ------
    CheckpointError
        If the manifest is unreadable, its tensors file is missing, or the
        file's SHA-256 does not match the manifest.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if directory.is_dir() and any(_TENSORS.match(p.name) for p in directory.iterdir()):
            log.warning(
                "%s holds tensors but no %s (a save was interrupted before its first "
                "commit); starting from scratch",
                directory,
                MANIFEST,
            )
        return None
    try:
        body = json.loads(manifest.read_text(encoding="utf-8"))
        round_, name, sha = int(body["round"]), str(body["weights_file"]), str(body["sha256"])
        config, metrics = dict(body["config"]), list(body["metrics"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{manifest} is unreadable or incomplete; delete the checkpoint folder to start the run afresh"
        ) from None
    if body.get("version") != VERSION:
        raise CheckpointError(
            f"{manifest} has version {body.get('version')!r}; this fedseal reads version {VERSION}"
        )
    if not _TENSORS.match(name):
        raise CheckpointError(f"{manifest} names an unexpected tensors file {name!r}")
    tensors_path = directory / name
    if not tensors_path.is_file():
        raise CheckpointError(
            f"{tensors_path}, named by {manifest}, is missing; restore it or "
            "delete the checkpoint folder to start afresh"
        )
    actual = _sha256(tensors_path)
    if actual != sha:
        raise CheckpointError(
            f"{tensors_path} does not match the SHA-256 in {manifest} (the file "
            "is corrupted); restore it or delete the checkpoint folder to start "
            "afresh"
        )
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path} cannot be read: {exc}") from None
    weights = {k[len(WEIGHTS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(WEIGHTS_PREFIX)}
    state = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    return Checkpoint(round=round_, weights=weights, strategy_state=state, metrics=metrics, config=config)


def _normalise(config: Mapping[str, Any]) -> dict[str, Any]:
    def value(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {str(k).replace("-", "_"): value(v) for k, v in config.items()}


def check_resume_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    *,
    ignore: Iterable[str] = IGNORED_KEYS,
    growable: Iterable[str] = GROWABLE_KEYS,
) -> None:
    """Refuse to resume a run whose settings differ from the checkpoint's.

    Parameters
    ----------
    saved, current
        The checkpoint's config and the config of the run that would resume it
        (dashed or underscored keys).
    keys
        Keys to compare; None compares every key of either config except ``ignore``.
    ignore
        Keys that may differ (output folder, timeouts, device, ...).
    growable
        Keys whose value may grow but not shrink (``rounds``).

    Raises
    ------
    CheckpointError
        Listing every differing key with its saved and current value.
    """
    old, new = {**INTRODUCED_KEYS, **_normalise(saved)}, _normalise(current)
    ignored = {k.replace("-", "_") for k in ignore}
    grows = {k.replace("-", "_") for k in growable}
    names = (
        [k.replace("-", "_") for k in keys] if keys is not None else sorted((set(old) | set(new)) - ignored)
    )
    missing = object()
    diffs = []
    for name in names:
        a, b = old.get(name, missing), new.get(name, missing)
        if a == b:
            continue
        if (
            name in grows
            and a is not missing
            and b is not missing
            and isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and b >= a
        ):
            continue
        show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
        rule = " (may grow, not shrink)" if name in grows else ""
        diffs.append(f"{name.replace('_', '-')}{rule}: saved {show(a)}, now {show(b)}")
    if diffs:
        raise CheckpointError(
            "cannot resume: the checkpoint was written with different settings: "
            + "; ".join(diffs)
            + ". Resume with the saved values, or start a new run in another output folder"
        )


def check_resume_phases(
    rows: Sequence[Any],
    completed: int,
    phase_of: Callable[[int], str],
    *,
    require_recorded: bool,
    saved_rounds: object,
) -> None:
    """Refuse to resume a run whose completed rounds this fedseal would have trained differently.

    Each metrics row of a completed round records what the round trained (``phase``);
    ``phase_of(round)`` is what the resuming run's schedule trains in that round. The
    schedule is derived from the settings, which :func:`check_resume_config` compares
    (except ``rounds``, which may grow without DP, and LP-FT's split follows them), and
    from the rule in the code, which a newer fedseal may change (LP-FT's split under the
    sum's noise did): resuming across such a change would train the head again after
    adapter rounds, or carry an optimiser state into another phase. The rows must be
    those of rounds 1 to ``completed``, one each.

    Rows written before phases were recorded have none: they pass unless
    ``require_recorded`` (a run whose split an older fedseal drew differently).

    Raises
    ------
    CheckpointError
        If the rows are malformed or do not cover rounds 1 to ``completed``, naming the
        first round whose recorded phase differs, or that recorded none although
        ``require_recorded``.
    """
    rounds: list[int] = []
    for row in rows:
        value = row.get("round") if isinstance(row, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(
                f"a metrics row of the checkpoint has no round number ({str(row)[:80]!r}); "
                "restore the checkpoint the run wrote, or start a new run in another output folder"
            )
        rounds.append(value)
    rounds.sort()
    if rounds != list(range(1, completed + 1)):
        raise CheckpointError(
            f"the checkpoint completed {completed} round(s) but its metrics hold rows of rounds "
            f"{rounds[:10]}{'...' if len(rounds) > 10 else ''}; restore the checkpoint "
            "the run wrote, or start a new run in another output folder"
        )
    for row in rows:
        server_round = row["round"]
        now, saved = phase_of(server_round), row.get("phase")
        if saved is None and not require_recorded:
            continue
        if saved is None:
            raise CheckpointError(
                f"cannot resume: the checkpoint was written by a fedseal that did not record "
                f"each round's phase, and this fedseal may split an LP-FT run's rounds "
                f"differently (round {server_round} would train {now!r}). Finish the run with "
                "the fedseal that started it, or start a new run in another output folder"
            )
        if saved != now:
            raise CheckpointError(
                f"cannot resume: round {server_round} of the checkpoint trained {saved!r}, and "
                f"this run's schedule trains {now!r} in it (the checkpoint's rounds: "
                f"{saved_rounds!r}; LP-FT splits its rounds by --rounds and by the rule of the "
                "fedseal that runs it). Resume with the saved rounds and the fedseal that "
                "started the run, or start a new run in another output folder"
            )


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "check_resume_config",
    "check_resume_phases",
    "load_checkpoint",
    "save_checkpoint",
]
