"""Malformed variants of a reply, generated from its declared type (common/egress.py).

:func:`variants` takes a well-formed reply and yields ``(kind, reply)`` pairs,
each a copy with one thing wrong: a field deleted, retyped, out of range, NaN
or infinite, oversized; an extra field or record; a record of the wrong kind;
an array of the wrong shape, dtype or content; an error instead of content.
A hostile site can send any of them; the server must drop it and name it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedseal.common import egress

_SCALARS = {"text": "x", "bytes": b"x", "int": 7, "float": 1.5, "bool": True, "list": [1, 2]}
_BAD_FLOATS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _copy(reply: Message) -> Message:
    return Message(copy.deepcopy(reply.content), reply_to=_request(reply))


def _request(reply: Message) -> Message:
    request = Message(
        RecordDict(),
        dst_node_id=reply.metadata.src_node_id,
        message_type=reply.metadata.message_type or "train",
    )
    request.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    request.metadata.__dict__["_src_node_id"] = reply.metadata.dst_node_id
    return request


def _with_sender(mutated: Message, reply: Message) -> Message:
    mutated.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
    return mutated


def _scalar_variants(value: object) -> dict[str, object]:
    out = {f"as {name}": v for name, v in _SCALARS.items() if type(v) is not type(value)}
    if isinstance(value, float):
        out.update({f"float {name}": v for name, v in _BAD_FLOATS.items()})
        out["float huge"] = 1e300
        out["float negative"] = -abs(value) - 1.0
    if isinstance(value, int) and not isinstance(value, bool):
        out["int negative"] = -1
        out["int huge"] = 2**62
    if isinstance(value, str):
        out["text empty"] = ""
        out["text oversized"] = "x" * (egress.MAX_TEXT + 1)
    if isinstance(value, bytes) and value:
        out["bytes empty"] = b""
        out["bytes halved"] = value[: len(value) // 2]
        out["bytes one less"] = value[:-1]
        out["bytes one more"] = value + b"\x00"
        out["bytes doubled"] = value + value
        out["bytes single"] = value[:1]
        out["bytes zeros"] = bytes(len(value))
        out["bytes ones"] = b"\xff" * len(value)
        out["bytes first bit flipped"] = bytes([value[0] ^ 1]) + value[1:]
        out["bytes last bit flipped"] = value[:-1] + bytes([value[-1] ^ 0x80])
        out["bytes middle bit flipped"] = (
            value[: len(value) // 2] + bytes([value[len(value) // 2] ^ 0x10]) + value[len(value) // 2 + 1 :]
        )
        out["bytes reversed"] = value[::-1]
        out["bytes random"] = np.random.default_rng(len(value)).bytes(len(value))
    return out


def _array_variants(array: np.ndarray) -> dict[str, np.ndarray]:
    flat = array.reshape(-1)
    out = {
        "array truncated": flat[:-1] if flat.size > 1 else np.zeros(0, array.dtype),
        "array one more": np.append(flat, flat[:1]),
        "array extra dim": array.reshape(1, *array.shape),
        "array as int32": array.astype(np.int32),
        "array as bool": array.astype(bool),
        "array empty": np.zeros((0,), dtype=array.dtype),
    }
    if array.ndim == 2:
        out["array transposed"] = (
            np.ascontiguousarray(array.T) if array.shape[0] != array.shape[1] else array.reshape(-1)
        )
    if np.issubdtype(array.dtype, np.floating):
        for name, value in _BAD_FLOATS.items():
            bad = array.copy()
            bad.reshape(-1)[0] = value
            out[f"array holds {name}"] = bad
        out["array as float16"] = array.astype(np.float16)
    return out


def variants(reply: Message) -> Iterator[tuple[str, Message]]:
    """Every single-fault variant of ``reply`` (its content must be well formed)."""
    yield "error reply", _with_sender(Message(Error(code=0, reason="boom"), reply_to=_request(reply)), reply)
    yield "empty content", _with_sender(Message(RecordDict(), reply_to=_request(reply)), reply)
    names = list(reply.content.keys())
    for name in names:
        record = reply.content[name]
        mutated = _copy(reply)
        del mutated.content[name]
        yield f"{name}: record deleted", _with_sender(mutated, reply)
        mutated = _copy(reply)
        del mutated.content[name]
        mutated.content[name] = (
            MetricRecord({"x": 1.0}) if not isinstance(record, MetricRecord) else ConfigRecord({"x": b"1"})
        )
        yield f"{name}: record of another kind", _with_sender(mutated, reply)
        if isinstance(record, ArrayRecord):
            for key in list(record.keys()):
                array = record[key].numpy()
                for what, bad in _array_variants(array).items():
                    mutated = _copy(reply)
                    mutated.content[name][key] = Array(np.ascontiguousarray(bad))
                    yield f"{name}[{key}]: {what}", _with_sender(mutated, reply)
                mutated = _copy(reply)
                del mutated.content[name][key]
                yield f"{name}[{key}]: deleted", _with_sender(mutated, reply)
            mutated = _copy(reply)
            mutated.content[name]["extra.weight"] = Array(np.zeros(3, np.float32))
            yield f"{name}: extra array", _with_sender(mutated, reply)
            continue
        for key in list(record.keys()):
            for what, bad in _scalar_variants(record[key]).items():
                if isinstance(record, MetricRecord) and (
                    isinstance(bad, bool) or not isinstance(bad, (int, float))
                ):
                    continue  # Flower's metric record cannot hold it: no site can send it
                mutated = _copy(reply)
                mutated.content[name][key] = bad
                yield f"{name}[{key}]: {what}", _with_sender(mutated, reply)
            mutated = _copy(reply)
            del mutated.content[name][key]
            yield f"{name}[{key}]: deleted", _with_sender(mutated, reply)
        mutated = _copy(reply)
        mutated.content[name]["extra"] = 1.0 if isinstance(record, MetricRecord) else "x"
        yield f"{name}: extra field", _with_sender(mutated, reply)
        for key in list(record.keys()):
            mutated = _copy(reply)
            mutated.content[name][key.upper() + "_"] = mutated.content[name][key]
            del mutated.content[name][key]
            yield f"{name}[{key}]: renamed", _with_sender(mutated, reply)
        mutated = _copy(reply)
        mutated.content[name + "_"] = mutated.content[name]
        del mutated.content[name]
        yield f"{name}: record renamed", _with_sender(mutated, reply)
    mutated = _copy(reply)
    mutated.content["extra"] = ConfigRecord({"x": "y"})
    yield "extra record", _with_sender(mutated, reply)
    mutated = _copy(reply)
    mutated.content["train-loss"] = MetricRecord({"train-loss": 0.3})
    yield "an undeclared statistic", _with_sender(mutated, reply)
    for name in names:
        mutated = _copy(reply)
        del mutated.content[name]
        mutated.content[name] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
        yield f"{name}: an array record instead", _with_sender(mutated, reply)
        record = reply.content[name]
        mutated = _copy(reply)
        del mutated.content[name]
        mutated.content[name] = type(record)()
        yield f"{name}: emptied", _with_sender(mutated, reply)
    mutated = _copy(reply)
    mutated.content[egress.REFUSAL] = ConfigRecord({"code": "site.internal"})
    yield "a refusal beside the answer", _with_sender(mutated, reply)
    mutated = _copy(reply)
    mutated.content[egress.STATUS] = ConfigRecord({"site": "someone-else", "private": True})
    yield "naming another site", _with_sender(mutated, reply)
