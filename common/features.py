"""Pooled sentence features of a set of texts, computed once per (texts, encoder) and reused.

Under ``finetune = probe`` the encoder never changes during a run (only the
head and the feature mean travel), so a site computes its features once: the
forward passes are the whole cost of a round otherwise. They are kept in
memory for the process and, when the site names a cache folder, in a file
named by a digest of everything they depend on: the texts, the encoder's
weights (:mod:`fedseal.common.digests`), the pooled layers and the maximum
length. A changed input gives a new digest, never a stale file. The cache holds
features of the site's private data: it belongs in the site's own state folder
(mode 0700), like its ledger.

The memory cache is bounded in bytes (:data:`MEMORY_BYTES`), not in entries: a
simulation's process serves every virtual site it is given, and the default
task's features for all its sites take about 55 MiB.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedseal.common.batches import model_inputs
from fedseal.common.digests import weights_digest
from fedseal.common.durable import atomic_write

log = logging.getLogger(__name__)

BATCH = 256
_MEMORY: OrderedDict[str, torch.Tensor] = OrderedDict()
MEMORY_BYTES = 1 << 30
"""Features kept in a process's memory, in bytes (the oldest go first)."""


def encoder_digest(model) -> str:
    """sha256 over the encoder's weights, names and shapes (what the features depend on);
    each frozen tensor is hashed once while it is unchanged (:mod:`fedseal.common.digests`)."""
    encoder = model.backbone
    return weights_digest((*encoder.named_parameters(), *encoder.named_buffers()))


def features_key(model, data: TensorDataset) -> str:
    """The digest naming ``model``'s features of ``data`` (token ids, mask, layers)."""
    h = hashlib.sha256(b"fedseal.features.v1\0")
    h.update(encoder_digest(model).encode())
    h.update(repr(list(model.config.fedseal_layers)).encode())
    for tensor in data.tensors[:2]:
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_features(model, data: TensorDataset, device: torch.device) -> torch.Tensor:
    """Unit-norm pooled features (float32, one row per example, in order)."""
    model.to(device).eval()
    input_ids, attention_mask = data.tensors[0], data.tensors[1]
    order = torch.argsort(attention_mask.sum(dim=1))  # similar lengths share a batch
    out = torch.empty(len(input_ids), model.feature_mean.shape[0])
    for start in range(0, len(order), BATCH):
        idx = order[start : start + BATCH]
        inputs = model_inputs(model, input_ids[idx], attention_mask[idx], device)
        out[idx] = model.features(**inputs).float().cpu()
    return out


def features(model, data: TensorDataset, device: torch.device, cache_dir: Path | None = None) -> torch.Tensor:
    """``compute_features``, from the process's memory or ``cache_dir`` when computed before."""
    key = features_key(model, data)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    result = None
    if path is not None and path.is_file():
        try:
            array = np.load(path, allow_pickle=False)
            if array.shape == (len(data), model.feature_mean.shape[0]) and np.isfinite(array).all():
                result = torch.from_numpy(array)
        except (OSError, ValueError) as exc:
            log.warning("feature cache %s is unreadable (%s); computing again", path, exc)
    if result is None:
        result = compute_features(model, data, device)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            buffer = _npy_bytes(result.numpy())
            atomic_write(path, buffer)
    _MEMORY[key] = result
    while len(_MEMORY) > 1 and sum(t.nelement() * t.element_size() for t in _MEMORY.values()) > MEMORY_BYTES:
        _MEMORY.popitem(last=False)
    return result


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


__all__ = ["MEMORY_BYTES", "compute_features", "encoder_digest", "features", "features_key"]
