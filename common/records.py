"""Conversion between model weights and Flower records, with validation.

Weights travel as one :class:`flwr.app.ArrayRecord` keyed by parameter name.
Everything received is checked (names, shapes, dtype, finiteness) before use.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedseal.common.config import FedConfig, from_mapping
from fedseal.common.errors import FedsealError

# Per-message values the server adds to the run's config record.
ROUND_KEY = "server-round"
JOB_KEY = "job-id"  # stable across server restarts: the key of a site's ledger entries
MESSAGE_KEYS = (ROUND_KEY, JOB_KEY)


class RecordError(FedsealError, ValueError):
    """A received record is malformed or does not match what was expected."""

    code = "records.error"


def to_numpy_state(state: Mapping[str, object]) -> OrderedDict[str, np.ndarray]:
    """float32 numpy copies of torch tensors or arrays, same order."""
    return OrderedDict(
        (k, (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float32))
        for k, v in state.items()
    )


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes and float32 bytes: identifies a set of weights."""
    digest = hashlib.sha256()
    for name, value in state.items():
        array = np.ascontiguousarray(value, dtype=np.float32)
        digest.update(f"{name}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named arrays into an ArrayRecord."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def record_to_state(
    record: ArrayRecord, template: Mapping[str, np.ndarray] | None = None, *, what: str = "weights"
) -> OrderedDict[str, np.ndarray]:
    """Unpack an ArrayRecord; with ``template``, require the same names and shapes."""
    try:
        state = OrderedDict((k, arr.numpy()) for k, arr in record.items())
    except Exception as exc:  # malformed bytes from the wire
        raise RecordError(f"{what}: cannot decode arrays ({exc})") from None
    if template is not None:
        if list(state) != list(template):
            missing = sorted(set(template) - set(state))[:3]
            extra = sorted(set(state) - set(template))[:3]
            raise RecordError(f"{what}: parameter names differ (missing {missing}, unexpected {extra})")
        for k, v in state.items():
            if v.shape != template[k].shape:
                raise RecordError(f"{what}: {k} has shape {v.shape}, expected {template[k].shape}")
    for k, v in state.items():
        if not np.issubdtype(v.dtype, np.floating):
            raise RecordError(f"{what}: {k} has dtype {v.dtype}, expected floating point")
        if not np.isfinite(v).all():
            raise RecordError(f"{what}: {k} contains NaN or inf")
    return state


def flatten(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays concatenated into one float64 vector (template order)."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in state.values()])


def unflatten(vector: np.ndarray, template: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`flatten` for the shapes in ``template`` (float32 out)."""
    size = sum(v.size for v in template.values())
    if vector.shape != (size,):
        raise RecordError(f"vector has shape {vector.shape}, expected ({size},)")
    out, offset = OrderedDict(), 0
    for k, v in template.items():
        out[k] = vector[offset : offset + v.size].reshape(v.shape).astype(np.float32)
        offset += v.size
    return out


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (what dominates a message's size)."""
    return sum(len(arr.data) for arr in record.values())


def config_to_record(cfg: FedConfig, **extra: int | float | str | bool) -> ConfigRecord:
    """The run's configuration, plus per-message values, as a ConfigRecord."""
    return ConfigRecord({**cfg.to_run_config(), **extra})


def record_to_config(record: ConfigRecord, extra_keys: tuple[str, ...] = MESSAGE_KEYS) -> FedConfig:
    """Rebuild the validated config from a ConfigRecord, ignoring ``extra_keys``."""
    return from_mapping(
        {k: v for k, v in record.items() if k not in extra_keys}, source="the server's message"
    )
