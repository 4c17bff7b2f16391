"""Everything a site sends, declared field by field: the one way out, and the server's check.

A site's replies are the only bytes of it that reach the server, so each reply
type is declared here with every record and key it may hold, and each field
says why it may leave the site (:class:`Kind`):

``dp-release``
    an output of a mechanism the site's accountant counts (a DP-SGD update, a
    noisy statistics or evaluation sum);
``post-processing``
    computed from a DP release and from public values only (costs no privacy);
``public``
    a setting or a number fixed by public settings, the site's own policy and
    the ledger's arithmetic, depending on the site's data at most through its
    coarse size bucket (:func:`fedseal.common.buckets.size_bucket`);
``protocol``
    secure-aggregation material: public keys, encrypted shares, masked vectors,
    signatures.

:func:`build` is the only way a site makes a reply (``tests/test_egress.py``
checks that no other module constructs one): it refuses a record or key the
type does not declare, and a value of the wrong form. :func:`parse` is the
server's side of the same declaration: every reply is checked against its type
before any value is used, and a reply that departs from it raises
:class:`ReplyError` with a reason code, never anything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedseal.common import secagg_wire as wire
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import stats_rounds
from fedseal.common.errors import FedsealError
from fedseal.common.refusals import PUBLIC_VALUES, Code, public_values


class Kind(StrEnum):
    """Why a field may leave a site."""

    RELEASE = "dp-release"
    DERIVED = "post-processing"
    PUBLIC = "public"
    PROTOCOL = "protocol"


class Form(StrEnum):
    """What a field's value is on the wire."""

    FLOAT = "float"  # a finite number (metric record)
    COUNT = "count"  # a non-negative integer (metric record)
    FLAG = "flag"  # a bool (config record)
    TEXT = "text"  # a short string (config record)
    BYTES = "bytes"  # protocol bytes (config record)
    ARRAYS = "arrays"  # a whole array record: float arrays named and shaped as a template
    RING = "ring"  # one uint32 vector of a given length (array record, key ``y``)


_RECORD_OF = {
    Form.FLOAT: "metric",
    Form.COUNT: "metric",
    Form.FLAG: "config",
    Form.TEXT: "config",
    Form.BYTES: "config",
    Form.ARRAYS: "array",
    Form.RING: "array",
}
EVAL_LOSS_CLIP = 5.0
"""Federated evaluation counts one example's cross-entropy as at most this (a confident
mistake), so its loss lies in ``[0, EVAL_LOSS_CLIP]`` (:mod:`fedseal.client.evaluation`)."""
MAX_TEXT = 200
"""The longest text a reply field may hold."""
MAX_BYTES = 1 << 26
"""The longest bytes value a reply field may hold (64 MiB)."""


@dataclass(frozen=True)
class Field:
    """One declared field of a reply: record, key, form, why it may leave, and whether required."""

    record: str
    key: str
    form: Form
    kind: Kind
    why: str
    required: bool = True
    bounds: tuple[float, float] | None = None  # a number outside is a reply no honest site sends


@dataclass(frozen=True)
class ReplyType:
    """A reply a site may send: its name and every field it may hold."""

    name: str
    fields: tuple[Field, ...]

    def records(self) -> dict[str, str]:
        """Record name -> ``metric``, ``config`` or ``array``."""
        return {f.record: _RECORD_OF[f.form] for f in self.fields}

    def field(self, record: str, key: str) -> Field:
        """The declared field ``record[key]``; KeyError if undeclared."""
        for f in self.fields:
            if f.record == record and f.key == key:
                return f
        raise KeyError(f"{self.name} declares no field {record}[{key!r}]")


class EgressError(FedsealError):
    """A site tried to send a field its reply type does not declare, or a value of another form."""

    code = "egress.undeclared"


class ReplyError(FedsealError):
    """A reply departs from its declared type; ``reason`` is a stable code for the metrics."""

    code = "reply.invalid"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


# Reason codes of replies the server drops (see :func:`parse`).
REPLY_MISSING = "reply.missing"  # a declared, required record or field is absent
REPLY_EXTRA = "reply.extra"  # a record or field the type does not declare
REPLY_FORM = "reply.form"  # a value of the wrong type, size or shape
REPLY_NONFINITE = "reply.nonfinite"  # NaN or infinity
REPLY_RANGE = "reply.range"  # a value outside what an honest site can send
REPLY_ERROR = "reply.error"  # Flower's error reply instead of content
REPLY_TIMEOUT = "reply.timeout"  # no reply before the stage's deadline
REPLY_IDENTITY = "reply.identity"  # the reply names a site other than its sender
REPLY_PROTOCOL = "reply.protocol"  # a secure-aggregation value the protocol rejects

STATUS, METRICS, UPDATE, REFUSAL = "status", "metrics", "update", "refusal"
SECAGG, MASKED = wire.RECORD, wire.MASKED

_SITE = Field(
    STATUS,
    "site",
    Form.TEXT,
    Kind.PUBLIC,
    "the site's name as its operator configured it (the server keys records by the "
    "sender it authenticated, not by this)",
)
_PRIVATE = Field(
    STATUS,
    "private",
    Form.FLAG,
    Kind.PUBLIC,
    "whether the round was trained with DP: a run setting the site enforced",
)
_PLAN = (
    Field(
        METRICS,
        "epsilon",
        Form.FLOAT,
        Kind.PUBLIC,
        "the site's total epsilon after this round: the accountant applied to the plan's "
        "(noise, rate, steps), which depend on the data only through its size bucket, plus "
        "other jobs' recorded spend (-1: the run is not private)",
        bounds=(-1.0, math.inf),
    ),
    Field(
        METRICS,
        "delta",
        Form.FLOAT,
        Kind.PUBLIC,
        "the site's total delta: the ledger's grants",
        bounds=(-1.0, 1.0),
    ),
    Field(
        METRICS,
        "steps",
        Form.COUNT,
        Kind.PUBLIC,
        "DP steps this job has taken at the site: set by the rule from rounds, not data",
    ),
    Field(
        METRICS,
        "noise-multiplier",
        Form.FLOAT,
        Kind.PUBLIC,
        "the job's calibrated noise: a function of the budget, steps and sampling rate",
        bounds=(0.0, math.inf),
    ),
    Field(
        METRICS,
        "sample-rate",
        Form.FLOAT,
        Kind.PUBLIC,
        "the job's Poisson rate: set from the site's size bucket, not its exact count",
        bounds=(0.0, 1.0),
    ),
)


def _update(kind: Kind, why: str) -> Field:
    return Field(UPDATE, "*", Form.ARRAYS, kind, why)


def _weight(kind: Kind, why: str) -> Field:
    return Field(METRICS, "weight", Form.FLOAT, kind, why)


REFUSAL_REPLY = ReplyType(
    "refusal",
    (
        Field(REFUSAL, "code", Form.TEXT, Kind.PUBLIC, "a reason code (fedseal.common.refusals.Code)"),
        *(
            Field(
                REFUSAL,
                name,
                Form.TEXT,
                Kind.PUBLIC,
                "see fedseal.common.refusals.PUBLIC_VALUES",
                required=False,
            )
            for name in PUBLIC_VALUES
        ),
        Field(STATUS, "site", Form.TEXT, Kind.PUBLIC, _SITE.why),
    ),
)
STATISTICS = ReplyType(
    "statistics",
    (
        _update(
            Kind.RELEASE,
            "the noisy sum of the sampled statistics rows (feature mean, label "
            "proportions): one step of the sampled Gaussian mechanism",
        ),
        _weight(Kind.DERIVED, "the noisy count of the same release over the public size cap"),
        *_PLAN,
        _SITE,
        _PRIVATE,
    ),
)
TRAINING = ReplyType(
    "training",
    (
        _update(Kind.RELEASE, "the weighted change of the trainable weights after DP-SGD"),
        _weight(Kind.PUBLIC, "the weighting rule applied to the site's size bucket"),
        *_PLAN,
        _SITE,
        _PRIVATE,
    ),
)
VOTE = ReplyType(
    "vote",
    (
        _update(Kind.DERIVED, "the DP-SGD update in units of its own median move, and that unit"),
        _weight(Kind.PUBLIC, "the weighting rule applied to the site's size bucket"),
        *_PLAN,
        _SITE,
        _PRIVATE,
    ),
)
SECAGG_ADVERT = ReplyType(
    "secagg.advert",
    (
        Field(SECAGG, wire.ADVERT, Form.BYTES, Kind.PROTOCOL, "fresh public keys, signed"),
        _SITE,
        _PRIVATE,
    ),
)
SECAGG_SHARE_KEYS = ReplyType(
    "secagg.share_keys",
    (
        Field(SECAGG, wire.SHARES, Form.BYTES, Kind.PROTOCOL, "commitments to the dealt shares, signed"),
        Field(SECAGG, wire.CIPHERTEXTS, Form.BYTES, Kind.PROTOCOL, "shares encrypted to each neighbour"),
    ),
)
SECAGG_MASKED_INPUT = ReplyType(
    "secagg.masked_input",
    (
        Field(
            MASKED,
            wire.Y,
            Form.RING,
            Kind.PROTOCOL,
            "the encoded update plus pairwise and self masks (uniform on the ring alone)",
        ),
        Field(SECAGG, wire.COMPLAINTS, Form.BYTES, Kind.PROTOCOL, "proof against a neighbour's bad share"),
        *_PLAN,
        _SITE,
        _PRIVATE,
    ),
)
SECAGG_CONSISTENCY = ReplyType(
    "secagg.consistency",
    (Field(SECAGG, wire.SIGNATURE, Form.BYTES, Kind.PROTOCOL, "the site's signature on the view"),),
)
SECAGG_UNMASK = ReplyType(
    "secagg.unmask",
    (
        Field(SECAGG, wire.B_SHARES, Form.BYTES, Kind.PROTOCOL, "self-mask shares of survivors"),
        Field(SECAGG, wire.SK_SHARES, Form.BYTES, Kind.PROTOCOL, "mask-key shares of dropped sites"),
        Field(SECAGG, wire.SEEDS, Form.BYTES, Kind.PROTOCOL, "pairwise seeds with dropped neighbours"),
    ),
)
EVALUATION = ReplyType(
    "evaluation",
    (
        Field(
            METRICS,
            "accuracy",
            Form.FLOAT,
            Kind.RELEASE,
            "noisy correct count over noisy count: one step of the sampled Gaussian mechanism",
            bounds=(0.0, 1.0),
        ),
        Field(
            METRICS,
            "loss",
            Form.FLOAT,
            Kind.RELEASE,
            "noisy clipped loss sum of the same step over the noisy count",
            bounds=(0.0, EVAL_LOSS_CLIP),
        ),
        *_PLAN,
        _SITE,
        _PRIVATE,
    ),
)


def train_reply_type(cfg: FedConfig, server_round: int) -> ReplyType:
    """The reply type a ``train`` message of ``server_round`` gets from a site that trains."""
    from fedseal.common.vote import is_vote_round

    if cfg.secagg:
        return SECAGG_ADVERT
    if server_round <= stats_rounds(cfg):
        return STATISTICS
    return VOTE if is_vote_round(cfg, server_round) else TRAINING


REPLY_TYPES = (
    REFUSAL_REPLY,
    STATISTICS,
    TRAINING,
    VOTE,
    SECAGG_ADVERT,
    SECAGG_SHARE_KEYS,
    SECAGG_MASKED_INPUT,
    SECAGG_CONSISTENCY,
    SECAGG_UNMASK,
    EVALUATION,
)
"""Every reply a site sends."""


# -- the site's side -----------------------------------------------------------------------


def build(reply_type: ReplyType, msg: Message, values: Mapping[str, Mapping[str, Any]]) -> Message:
    """The reply of type ``reply_type`` to ``msg`` holding exactly ``values``.

    ``values`` maps each record name to its keys and values; an ``arrays``
    field is given as ``{"*": {name: array}}``, a ``ring`` field as its vector.

    Raises
    ------
    EgressError
        If a record or key is not declared by ``reply_type``, a required one is
        missing, or a value is not of its declared form.
    """
    records = reply_type.records()
    content = RecordDict()
    for record, entries in values.items():
        if record not in records:
            raise EgressError(f"{reply_type.name} declares no record {record!r}")
        if records[record] == "array":
            ((key, value),) = entries.items()
            fld = _declared(reply_type, record, key)
            content[record] = (
                _arrays_out(value) if fld.form is Form.ARRAYS else ArrayRecord({key: Array(_ring_out(value))})
            )
            continue
        out = {}
        for key, value in entries.items():
            out[key] = _scalar_out(_declared(reply_type, record, key), value)
        content[record] = MetricRecord(out) if records[record] == "metric" else ConfigRecord(out)
    for f in reply_type.fields:
        if f.required and (f.record not in values or f.key not in values[f.record]):
            raise EgressError(f"{reply_type.name} requires {f.record}[{f.key!r}]")
    return Message(content, reply_to=msg)


def refusal_reply(msg: Message, site: str, code: Code, public: Mapping[str, object]) -> Message:
    """A refusal of ``msg`` by ``site``: its name, the code and the public values, nothing else."""
    values = {k: str(v) for k, v in public_values(public).items()}
    return build(
        REFUSAL_REPLY, msg, {REFUSAL: {"code": str(Code(code)), **values}, STATUS: {"site": site[:MAX_TEXT]}}
    )


def _declared(reply_type: ReplyType, record: str, key: str) -> Field:
    try:
        return reply_type.field(record, key)
    except KeyError as exc:
        raise EgressError(str(exc)) from None


def _scalar_out(fld: Field, value: Any) -> Any:
    ok = {
        Form.FLOAT: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        Form.COUNT: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        Form.FLAG: lambda v: isinstance(v, bool),
        Form.TEXT: lambda v: isinstance(v, str) and len(v) <= MAX_TEXT,
        Form.BYTES: lambda v: isinstance(v, bytes) and len(v) <= MAX_BYTES,
    }[fld.form]
    if not ok(value):
        raise EgressError(f"{fld.record}[{fld.key!r}] must be a {fld.form.value}, got {type(value).__name__}")
    return float(value) if fld.form is Form.FLOAT else value


def _arrays_out(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    out = {}
    for name, value in arrays.items():
        array = np.ascontiguousarray(value, dtype=np.float32)
        if not np.isfinite(array).all():
            raise EgressError(f"array {name!r} holds NaN or infinity")
        out[name] = Array(array)
    return ArrayRecord(out)


def _ring_out(value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype != np.uint32 or array.ndim != 1:
        raise EgressError("a ring vector must be one-dimensional uint32")
    return np.ascontiguousarray(array)


# -- the server's side ---------------------------------------------------------------------


def parse(
    reply_type: ReplyType,
    reply: Message,
    *,
    template: Mapping[str, np.ndarray] | None = None,
    ring_length: int | None = None,
    only: tuple[str, ...] | None = None,
) -> dict[str, dict[str, Any]]:
    """The values of ``reply``, checked against ``reply_type`` before any is used.

    ``template`` names and shapes an ``arrays`` field; ``ring_length`` is a
    ``ring`` field's length. Returns ``{record: {key: value}}`` with arrays as
    float64 numpy arrays (``{"*": {name: array}}``) and a ring vector as uint32.
    With ``only``, only those records' values are decoded (the others are
    still checked to be present and of their kind).

    Raises
    ------
    ReplyError
        With a reason code (:data:`REPLY_MISSING`, :data:`REPLY_EXTRA`,
        :data:`REPLY_FORM`, :data:`REPLY_NONFINITE`, :data:`REPLY_RANGE`,
        :data:`REPLY_ERROR`) on the first departure; the server drops the reply and names the code.
    """
    if reply.has_error():
        raise ReplyError(REPLY_ERROR, f"error reply (code {reply.error.code})")
    if not reply.has_content():
        raise ReplyError(REPLY_MISSING, "the reply has no content")
    content = reply.content
    records = reply_type.records()
    present = {
        **{n: "metric" for n in content.metric_records},
        **{n: "config" for n in content.config_records},
        **{n: "array" for n in content.array_records},
    }
    for name, kind in present.items():
        if name not in records:
            raise ReplyError(REPLY_EXTRA, f"{reply_type.name} has no record {name!r}")
        if kind != records[name]:
            raise ReplyError(REPLY_FORM, f"record {name!r} is a {kind} record, not {records[name]}")
    out: dict[str, dict[str, Any]] = {}
    for name, kind in records.items():
        fields = [f for f in reply_type.fields if f.record == name]
        if name not in present:
            if any(f.required for f in fields):
                raise ReplyError(REPLY_MISSING, f"record {name!r} is missing")
            continue
        if only is not None and name not in only:
            continue
        if kind == "array":
            fld = fields[0]
            out[name] = (
                {"*": _arrays_in(content.array_records[name], template)}
                if fld.form is Form.ARRAYS
                else {fld.key: _ring_in(content.array_records[name], fld.key, ring_length)}
            )
            continue
        record = content.metric_records[name] if kind == "metric" else content.config_records[name]
        declared = {f.key: f for f in fields}
        for key in record.keys():
            if key not in declared:
                raise ReplyError(REPLY_EXTRA, f"{reply_type.name} has no field {name}[{key!r}]")
        values = {}
        for key, fld in declared.items():
            if key not in record:
                if fld.required:
                    raise ReplyError(REPLY_MISSING, f"{name}[{key!r}] is missing")
                continue
            values[key] = _scalar_in(fld, record[key])
        out[name] = values
    return out


def _scalar_in(fld: Field, value: Any) -> Any:
    where = f"{fld.record}[{fld.key!r}]"
    if fld.form is Form.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReplyError(REPLY_FORM, f"{where} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise ReplyError(REPLY_NONFINITE, f"{where} is not finite")
        if fld.bounds is not None and not fld.bounds[0] <= value <= fld.bounds[1]:
            raise ReplyError(
                REPLY_RANGE, f"{where} = {value:g} is outside [{fld.bounds[0]:g}, {fld.bounds[1]:g}]"
            )
        return float(value)
    if fld.form is Form.COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ReplyError(REPLY_FORM, f"{where} is not a non-negative integer")
        return value
    if fld.form is Form.FLAG:
        if not isinstance(value, bool):
            raise ReplyError(REPLY_FORM, f"{where} is not a bool")
        return value
    if fld.form is Form.TEXT:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ReplyError(REPLY_FORM, f"{where} is not a text of at most {MAX_TEXT} characters")
        return value
    if not isinstance(value, bytes) or len(value) > MAX_BYTES:
        raise ReplyError(REPLY_FORM, f"{where} is not bytes of at most {MAX_BYTES}")
    return value


def _arrays_in(record: ArrayRecord, template: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if template is None:
        raise ValueError("parsing an arrays field needs the template it must match")
    names = list(record.keys())
    if names != list(template):
        missing = sorted(set(template) - set(names))[:3]
        extra = sorted(set(names) - set(template))[:3]
        raise ReplyError(
            REPLY_EXTRA if extra else REPLY_MISSING,
            f"array names differ (missing {missing}, unexpected {extra})",
        )
    out = {}
    for name in names:
        try:
            array = record[name].numpy()
        except Exception:  # noqa: BLE001 - malformed bytes from the wire, whatever numpy says
            raise ReplyError(REPLY_FORM, f"array {name!r} cannot be decoded") from None
        if not np.issubdtype(array.dtype, np.floating) or array.shape != template[name].shape:
            raise ReplyError(
                REPLY_FORM,
                f"array {name!r} is {array.dtype}{array.shape}, expected float{template[name].shape}",
            )
        if not np.isfinite(array).all():
            raise ReplyError(REPLY_NONFINITE, f"array {name!r} holds NaN or infinity")
        out[name] = array.astype(np.float64)
    return out


def _ring_in(record: ArrayRecord, key: str, length: int | None) -> np.ndarray:
    if length is None:
        raise ValueError("parsing a ring field needs its length")
    if list(record.keys()) != [key]:
        raise ReplyError(REPLY_EXTRA, f"the ring record must hold only {key!r}")
    array = record[key]
    if array.dtype != "uint32" or tuple(array.shape) != (length,):
        raise ReplyError(REPLY_FORM, f"the ring vector must be uint32 of shape ({length},)")
    try:
        return array.numpy()
    except Exception:  # noqa: BLE001 - malformed bytes from the wire
        raise ReplyError(REPLY_FORM, "the ring vector cannot be decoded") from None


def refusal_of(reply: Message) -> tuple[str, dict[str, str]] | None:
    """``(code, public values)`` if ``reply`` is a well-formed refusal, else None.

    Raises
    ------
    ReplyError
        If the reply carries a refusal record that departs from its type, or a
        code that is not a :class:`~fedseal.common.refusals.Code`.
    """
    if reply.has_error() or not reply.has_content() or REFUSAL not in reply.content.config_records:
        return None
    values = parse(REFUSAL_REPLY, reply)[REFUSAL]
    code = values.pop("code")
    if code not in {c.value for c in Code}:
        raise ReplyError(REPLY_FORM, "the refusal's code is not one fedseal knows")
    return code, values


__all__ = [
    "EVALUATION",
    "EgressError",
    "Field",
    "Form",
    "Kind",
    "REFUSAL_REPLY",
    "REPLY_TYPES",
    "ReplyError",
    "ReplyType",
    "SECAGG_ADVERT",
    "SECAGG_CONSISTENCY",
    "SECAGG_MASKED_INPUT",
    "SECAGG_SHARE_KEYS",
    "SECAGG_UNMASK",
    "STATISTICS",
    "TRAINING",
    "VOTE",
    "build",
    "parse",
    "refusal_of",
    "refusal_reply",
    "train_reply_type",
]
