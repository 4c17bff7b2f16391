"""Token states below the lowest adapted layer, computed once per site and reused by every step.

Under LoRA in the top layers (:mod:`fedseal.common.top_layers`) the embeddings and
the layers below the lowest adapter never change during a run: their output for
a site's texts is the same in every step and every round. A site runs them once
and keeps, for each example:

* its token states entering the first adapted layer, only its real tokens (no
  padding): SST-2's sentences average 13 tokens against a maximum length of 64,
  so a padded cache would be five times larger. The top layers see no position
  information (an absolute-position encoder adds it in the embeddings), so
  removing the padding and padding again on the right is exact;
* the unit-norm pooled blocks of the pooled layers at or below the cut (those
  are fixed too), so the features of
  :class:`~fedseal.common.modeling_fedseal.FedsealForSequenceClassification`
  need only the top layers' blocks from a step.

The states are stored as float16 (half the memory; measured against float32 in
``docs/lora.md``: the top layers' pooled features differ by about 1e-4, far
below the DP noise), float32 when a value would overflow float16. Like
:mod:`fedseal.common.features`, results are kept in the process's memory and,
when the site names a cache folder, in a file named by a digest of everything
they depend on (the texts' token ids and masks, hence the maximum length; the
weights of the frozen layers; the cut; the pooled layers; the storage type). A
changed input gives a new digest, never a stale file. The cache holds states of
the site's private texts: it belongs in the site's own state folder (mode 0700).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedseal.common.batches import model_inputs
from fedseal.common.digests import weights_digest
from fedseal.common.durable import atomic_write
from fedseal.common.modeling_fedseal import pooled_block
from fedseal.common.top_layers import encoder_layers, fedseal_of

log = logging.getLogger(__name__)

BATCH = 256
STORAGE = torch.float16
"""Storage type of the token states (see the module docstring for the measurement)."""
MEMORY_BYTES = 3 * 2**30
"""States kept in the process's memory at most: all 67,349 SST-2 sentences are about 0.7 GB."""
_MEMORY: OrderedDict[str, HiddenStates] = OrderedDict()


@dataclass(frozen=True)
class HiddenStates:
    """A site's token states entering layer ``cut`` (0-based) and its pooled blocks below.

    ``states`` holds every example's real tokens, concatenated (``tokens x
    hidden``); example ``i`` is ``states[offsets[i]:offsets[i + 1]]``. ``lower``
    holds, per example, the unit-norm pooled blocks of the pooled layers
    ``<= cut`` (hidden-state indices, 0 = embeddings), in the config's order.
    """

    states: torch.Tensor
    offsets: torch.Tensor
    lower: torch.Tensor
    cut: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens per example."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (self.states, self.offsets, self.lower))

    def batch(
        self, index: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """States padded on the right to the longest of ``index``, its mask, its lower blocks."""
        index = torch.as_tensor(index, dtype=torch.long)
        lengths = self.lengths[index]
        longest = max(int(lengths.max()), 1) if len(index) else 1
        mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
        source = (self.offsets[index].unsqueeze(1) + torch.arange(longest).unsqueeze(0))[mask]
        states = torch.zeros(len(index), longest, self.states.shape[1], dtype=dtype)
        states[mask] = self.states[source].to(dtype)
        return (states.to(device), mask.long().to(device), self.lower[index].to(device, dtype))

    def chunks(self, index: torch.Tensor, max_tokens: int) -> Iterator[torch.Tensor]:
        """:func:`length_chunks` of ``index`` by these examples' lengths."""
        return length_chunks(self.lengths, index, max_tokens)


def length_chunks(lengths: torch.Tensor, index: torch.Tensor, max_tokens: int) -> Iterator[torch.Tensor]:
    """``index`` sorted by ``lengths[index]``, cut into runs of at most ``max_tokens`` padded tokens.

    Each example lands in one chunk, so per-example gradients (and their
    clipping) are the same whatever the chunks; similar lengths share a chunk,
    so little of the work is padding. A single example longer than
    ``max_tokens`` is a chunk of its own.
    """
    index = torch.as_tensor(index, dtype=torch.long)
    sorted_lengths, order = torch.sort(lengths[index].clamp(min=1), stable=True)
    order, ordered = index[order], sorted_lengths.tolist()
    start = 0
    for end in range(1, len(order) + 1):  # ascending: the next example is the longest
        if end == len(order) or (end + 1 - start) * ordered[end] > max_tokens:
            yield order[start:end]
            start = end


def frozen_digest(model, cut: int) -> str:
    """sha256 over the names, shapes and values of every backbone weight below layer ``cut``."""
    backbone = fedseal_of(model).backbone
    above = {
        id(t) for layer in encoder_layers(backbone)[cut:] for t in (*layer.parameters(), *layer.buffers())
    }
    pooler = getattr(backbone, "pooler", None)
    if pooler is not None:
        above |= {id(t) for t in (*pooler.parameters(), *pooler.buffers())}
    return weights_digest(
        (name, t)
        for name, t in (*backbone.named_parameters(), *backbone.named_buffers())
        if id(t) not in above
    )


def lower_layers(model, cut: int) -> list[int]:
    """The pooled layers (hidden-state indices) whose blocks the cache holds: those ``<= cut``."""
    return [layer for layer in fedseal_of(model).config.fedseal_layers if layer <= cut]


def hidden_key(model, data: TensorDataset, cut: int, storage: torch.dtype = STORAGE) -> str:
    """The digest naming ``model``'s cached states of ``data`` at ``cut``."""
    h = hashlib.sha256(b"fedseal.hidden.v1\0")
    h.update(frozen_digest(model, cut).encode())
    h.update(repr((cut, lower_layers(model, cut), str(storage))).encode())
    for tensor in data.tensors[:2]:
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_hidden(
    model, data: TensorDataset, cut: int, device: torch.device, storage: torch.dtype = STORAGE
) -> HiddenStates:
    """Run the frozen layers once over ``data`` (see the module docstring)."""
    fedseal = fedseal_of(model)
    backbone = fedseal.backbone
    if not 1 <= cut <= len(encoder_layers(backbone)):
        raise ValueError(
            f"cut {cut} is outside 1..{len(encoder_layers(backbone))}: at least the "
            "embeddings and one layer are frozen and cached"
        )
    was_training = backbone.training
    backbone.to(device).eval()
    input_ids, attention_mask = data.tensors[0], data.tensors[1]
    lowers = lower_layers(model, cut)
    per_example: list[torch.Tensor | None] = [None] * len(input_ids)
    lower = torch.empty(len(input_ids), len(lowers) * fedseal.config.hidden_size)
    order = torch.argsort(attention_mask.sum(dim=1))  # similar lengths share a batch
    for start in range(0, len(order), BATCH):
        idx = order[start : start + BATCH]
        inputs = model_inputs(backbone, input_ids[idx], attention_mask[idx], device)
        hidden = backbone(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"]
        if lowers:
            lower[idx] = (
                torch.cat([pooled_block(hidden[layer], mask) for layer in lowers], dim=-1).float().cpu()
            )
        states = hidden[cut].float().cpu()
        keep = mask.bool().cpu()
        for row, i in enumerate(idx.tolist()):
            per_example[i] = states[row][keep[row]]
    backbone.train(was_training)
    states = torch.cat(per_example)  # type: ignore[arg-type]
    stored = states.to(storage)
    if not torch.isfinite(stored).all():
        log.warning("token states overflow %s; the cache keeps them as float32", storage)
        stored = states
    lengths = torch.tensor([len(s) for s in per_example])  # type: ignore[arg-type]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return HiddenStates(stored, offsets, lower, cut)


def hidden_states(
    model,
    data: TensorDataset,
    cut: int,
    device: torch.device,
    cache_dir: Path | None = None,
    storage: torch.dtype = STORAGE,
) -> HiddenStates:
    """``compute_hidden``, from the process's memory or ``cache_dir`` when computed before."""
    key = hidden_key(model, data, cut, storage)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = Path(cache_dir) / f"hidden-{key}.npz" if cache_dir else None
    result = _read(path, model, data, cut) if path is not None and path.is_file() else None
    if result is None:
        result = compute_hidden(model, data, cut, device, storage)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, _npz_bytes(result))
    _MEMORY[key] = result
    while sum(h.nbytes for h in _MEMORY.values()) > MEMORY_BYTES and len(_MEMORY) > 1:
        _MEMORY.popitem(last=False)
    return result


def _npz_bytes(hidden: HiddenStates) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, states=hidden.states.numpy(), offsets=hidden.offsets.numpy(), lower=hidden.lower.numpy())
    return buffer.getvalue()


def _read(path: Path, model, data: TensorDataset, cut: int) -> HiddenStates | None:
    """The cached states at ``path`` if they fit ``data`` exactly, else None (and a warning)."""
    fedseal = fedseal_of(model)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            states, offsets, lower = arrays["states"], arrays["offsets"], arrays["lower"]
        lengths = data.tensors[1].sum(dim=1).numpy()
        width = fedseal.config.hidden_size
        fits = (
            offsets.shape == (len(lengths) + 1,)
            and offsets[0] == 0
            and np.array_equal(np.diff(offsets), lengths)
            and states.shape == (int(offsets[-1]), width)
            and lower.shape == (len(lengths), len(lower_layers(model, cut)) * width)
            and np.isfinite(states).all()
            and np.isfinite(lower).all()
        )
        if fits:
            return HiddenStates(
                torch.from_numpy(states), torch.from_numpy(offsets), torch.from_numpy(lower), cut
            )
        log.warning("hidden-state cache %s does not fit its data; computing again", path)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("hidden-state cache %s is unreadable (%s); computing again", path, exc)
    return None


__all__ = [
    "HiddenStates",
    "cached_logits",
    "compute_hidden",
    "frozen_digest",
    "hidden_key",
    "hidden_states",
    "length_chunks",
    "lower_layers",
]


@torch.no_grad()
def cached_logits(model, hidden: HiddenStates, device: torch.device, batch: int = 256) -> torch.Tensor:
    """``model``'s logits of every cached example, in order, running only its layers above the cut.

    What the whole model computes from the token ids (to float32 rounding when
    ``hidden`` is stored in float32): the server scores an LP-FT model on its
    held-out data this way each round, having run the frozen layers once.
    """
    from fedseal.common.top_layers import TopStack

    stack = TopStack(model, hidden.cut).to(device).eval()  # reads the model's current head
    out = [
        stack(*hidden.batch(torch.arange(start, min(start + batch, len(hidden))), device)).float().cpu()
        for start in range(0, len(hidden), batch)
    ]
    return torch.cat(out)
