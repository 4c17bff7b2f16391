"""Digests of a model's weights that name cached computations (features, hidden states).

A digest covers every named tensor's name, shape and values. Hashing a frozen
encoder's values (about 90 MB for the default model) takes a few tenths of a
second, and a site asks for it at every stage of every round, on a fresh working
copy of the model each time. So the digest of each frozen tensor's values
(``requires_grad`` off: frozen weights and buffers) is kept for the tensor object
while its storage and in-place version count stay the same, and a working copy
deep-copied from the process's cached model (:mod:`fedseal.client.cache`) takes
its frozen tensors' digests from the tensors it was copied from (:func:`inherit`),
so a frozen tensor is hashed once per process. A tensor that trains (LoRA's
adapters, the head) is hashed on every call: it changes between rounds. A write that
bypasses the version count (``tensor.data.copy_``) is not seen: frozen weights are never
written, and :mod:`fedseal.client.cache` assumes the same of the tensors it shares.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

_KNOWN: dict[int, tuple[weakref.ref, tuple, bytes]] = {}
"""``id(tensor) -> (weak reference, state when hashed, digest)``. Single dict operations
only, no lock: a weak reference's callback may run inside the garbage collector at any
point, and a lost race costs one hash more, never a wrong digest."""


def _state(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device)


def _values_digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).digest()


def _forgetter(key: int) -> Callable[[weakref.ref], None]:
    def forget(ref: weakref.ref) -> None:
        entry = _KNOWN.get(key)
        if entry is not None and entry[0] is ref:
            _KNOWN.pop(key, None)

    return forget


def _remember(tensor: torch.Tensor, state: tuple, digest: bytes) -> None:
    """Keep ``digest`` for ``tensor`` if it is still in ``state``, the one it was hashed in."""
    if _state(tensor) == state:
        key = id(tensor)
        _KNOWN[key] = (weakref.ref(tensor, _forgetter(key)), state, digest)


def values_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of ``tensor``'s values as float32; kept per tensor object while it is frozen and
    unchanged (same storage, same in-place version count)."""
    if tensor.requires_grad:
        return _values_digest(tensor)
    state = _state(tensor)
    known = _KNOWN.get(id(tensor))
    if known is not None and known[0]() is tensor and known[1] == state:
        return known[2]
    digest = _values_digest(tensor)
    _remember(tensor, state, digest)
    return digest


def inherit(source: nn.Module, copy: nn.Module) -> None:
    """Give ``copy``, a deep copy of ``source`` made just now (so its values are equal), the
    digests of ``source``'s frozen tensors, computed once and kept on ``source``'s."""
    pairs = zip(
        (*source.named_parameters(), *source.named_buffers()),
        (*copy.named_parameters(), *copy.named_buffers()),
        strict=True,
    )
    for (name, a), (other, b) in pairs:
        if name != other or a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{other} is not a copy of {name}")
        if not a.requires_grad and not b.requires_grad:
            _remember(b, _state(b), values_digest(a))


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each tensor's name, shape and values digest, in the order given."""
    h = hashlib.sha256(b"fedseal.weights.v1\0")
    for name, tensor in named:
        h.update(name.encode() + b"\0" + str(tuple(tensor.shape)).encode() + b"\0")
        h.update(values_digest(tensor))
    return h.hexdigest()


__all__ = ["inherit", "values_digest", "weights_digest"]
