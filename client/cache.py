"""What a ClientApp process keeps between messages: the loaded model, tokenised data, parsed keys.

Every message used to build the model and tokenizer from disk, tokenise the
site's file and parse its keys and roster again: about half a second of a
simulated site's round at 10 sites, and, with a roster of 1,000 sites parsed
seven times a round, the larger part of a round at 1,000 (the scale
benchmark, ``python -m simulations.bench.scale``, measures both). A deployed
site's process serves one site; a simulation's process (a Ray worker, or the
in-process grid) serves many virtual sites, one message at a time. So what is
kept here is keyed by everything it is derived from, never by who asks:

* the **model and tokenizer** by the settings that build them
  (:func:`model_key`); nothing in them comes from any site's data. The cached
  model itself is never handed out: each call gets a working copy
  (:func:`model_and_tokenizer`) whose trainable weights are its own. Under
  ``probe`` the frozen encoder is shared by the copies (it is never trained, and
  a changed encoder weight is noticed and the model rebuilt); under ``lora`` and
  ``full`` everything is copied, since DP-SGD trains the encoder's weights and
  Opacus attaches hooks to the module it trains;
* **tokenised data** by the digest of the texts and labels, the tokenizer and the
  maximum length (:func:`encoded`): a site gets back the tensors of exactly the
  examples it holds, whoever tokenised the same examples first;
* **parsed keys and rosters** by the digest of the file's bytes (:func:`parsed`):
  a site gets the parse of exactly the bytes it read from its own file;
* **objects one message hands to the next** (:func:`keep`, :func:`take`), such as
  a site's SecAgg+ state, by a key the caller derives from the object's own
  exported record (which holds the site's secrets): a kept object is taken
  once, by the message that presents that very record.

Memory is bounded (:data:`DATA_BYTES` for tokenised data, :data:`MODELS`
models); the oldest entries go first.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedseal.common.config import FedConfig
    from fedseal.common.data import Examples

log = logging.getLogger(__name__)

T = TypeVar("T")

MODELS = 2
"""Pristine models kept per process (a simulation has one; a test may switch)."""
DATA_BYTES = 512 * 2**20
"""Tokenised tensors kept per process, in bytes (the default task's 6,000 examples take 6 MiB)."""
PARSED = 10_000
"""Parsed key files and rosters kept per process (a simulation's process parses one key per
virtual site it serves, and the roster)."""
LIVE = 10_000
"""Objects handed from one message to the next (:func:`keep`, :func:`take`) per process."""

_lock = threading.Lock()
_models: OrderedDict[tuple, tuple[nn.Module, object, tuple]] = OrderedDict()
_data: OrderedDict[tuple, TensorDataset] = OrderedDict()
_parsed: OrderedDict[tuple, object] = OrderedDict()
_live: OrderedDict[Hashable, object] = OrderedDict()


def model_key(cfg: FedConfig) -> tuple:
    """The settings a site's model and tokenizer are built from (:func:`fedseal.common.model.build_model`)."""
    from fedseal.common.model import resolve_model_path

    return (
        resolve_model_path(cfg.model),
        cfg.finetune,
        tuple(cfg.labels),
        cfg.seed,
        cfg.lora_r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        tuple(cfg.lora_targets),
    )


def _frozen_state(model: nn.Module) -> tuple:
    """Identity and version of every tensor that a working copy shares with the cached model."""
    shared = getattr(model, "backbone", None)
    if shared is None:
        return ()
    return tuple((name, t.data_ptr(), t._version) for name, t in shared.state_dict().items())


def _working_copy(model: nn.Module, finetune: str) -> nn.Module:
    if finetune == "probe":
        # The frozen encoder is shared; the head and the feature mean are the copy's own.
        return copy.deepcopy(model, memo={id(model.backbone): model.backbone})
    from fedseal.common import digests

    working = copy.deepcopy(model)
    digests.inherit(model, working)  # its frozen weights' digests, hashed once per process
    return working


def model_and_tokenizer(cfg: FedConfig) -> tuple[nn.Module, object]:
    """A working copy of the model ``cfg`` describes, and its tokenizer, built once per process.

    The copy's trainable weights are its own (load the server's weights into
    them); under ``probe`` its encoder is the cached model's, frozen. If that
    encoder was changed in place since it was built, it is built afresh.
    """
    from fedseal.common.model import build_model, load_tokenizer

    key = model_key(cfg)
    with _lock:
        entry = _models.get(key)
        if entry is not None and _frozen_state(entry[0]) != entry[2]:
            log.warning("the cached %s encoder was changed in place; building it afresh", cfg.model)
            entry = None
        if entry is None:
            model = build_model(cfg, cfg.labels)
            entry = (model, load_tokenizer(cfg), _frozen_state(model))
            _models[key] = entry
            while len(_models) > MODELS:
                _models.popitem(last=False)
        _models.move_to_end(key)
        model, tokenizer, _ = entry
        return _working_copy(model, cfg.finetune), tokenizer


def _examples_digest(examples: Examples) -> str:
    h = hashlib.sha256(b"fedseal.examples.v1\0")
    for text in examples.texts:
        h.update(text.encode("utf-8") + b"\0")
    h.update(repr(list(examples.labels)).encode())
    return h.hexdigest()


def _nbytes(data: TensorDataset) -> int:
    return sum(t.element_size() * t.nelement() for t in data.tensors)


def encoded(tokenizer: object, examples: Examples, max_length: int) -> TensorDataset:
    """:func:`fedseal.common.batches.encode`, once per (examples, tokenizer, length) in a process.

    The tensors are shared by every caller with the same examples: read them, never
    write to them.
    """
    from fedseal.common.batches import encode

    key = (_tokenizer_key(tokenizer), max_length, _examples_digest(examples))
    with _lock:
        if key in _data:
            _data.move_to_end(key)
            return _data[key]
    data = encode(tokenizer, examples, max_length)
    with _lock:
        _data[key] = data
        while len(_data) > 1 and sum(_nbytes(d) for d in _data.values()) > DATA_BYTES:
            _data.popitem(last=False)
    return data


def _tokenizer_key(tokenizer: object) -> tuple:
    return (
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer) if hasattr(tokenizer, "__len__") else None,
    )  # type: ignore[arg-type]


def parsed(data: bytes, parse: Callable[[bytes], T]) -> T:
    """``parse(data)``, once per (parser, content) in a process: for keys and rosters read from files."""
    key = (getattr(parse, "__qualname__", repr(parse)), hashlib.sha256(data).digest())
    with _lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]  # type: ignore[return-value]
    value = parse(data)
    with _lock:
        _parsed[key] = value
        while len(_parsed) > PARSED:
            _parsed.popitem(last=False)
    return value


def keep(key: Hashable, value: object) -> None:
    """Hand ``value`` on to the next message that asks for ``key`` (:func:`take`)."""
    with _lock:
        _live[key] = value
        _live.move_to_end(key)
        while len(_live) > LIVE:
            _live.popitem(last=False)


def take(key: Hashable) -> object | None:
    """The value kept under ``key``, now no longer kept (None if there is none)."""
    with _lock:
        return _live.pop(key, None)


def clear() -> None:
    """Forget everything kept (tests; a long-lived process that wants its memory back)."""
    with _lock:
        _models.clear()
        _data.clear()
        _parsed.clear()
        _live.clear()


__all__ = [
    "DATA_BYTES",
    "LIVE",
    "MODELS",
    "PARSED",
    "clear",
    "encoded",
    "keep",
    "model_and_tokenizer",
    "model_key",
    "parsed",
    "take",
]
