"""``fedseal audit``: what a site's replies say about one record, measured against its budget.

A site promises that only its accounted DP release leaves it. This command
tests that promise from the outside, as the server would: it plants a *canary*
(a distinctive text with a label its words contradict, so its presence moves
what the site computes) in a site's data, runs the real site (the ClientApp's
``train`` and ``evaluate`` handlers, over :class:`~fedseal.simulations.local_grid.LocalGrid`
with real Flower messages from an honest server: the statistics round,
the training rounds, federated evaluation when on) ``--runs`` times with the
canary IN and as often with it OUT, fresh DP noise each run, and attacks every
field the server receives.

The fields are enumerated from the replies through
:mod:`fedseal.common.egress` (every metric, every array of the update and the
update whole, the status, refusals if any, and which reply type came back),
round by round. Each field gets one generic distinguisher, fitted on the first
half of the runs of each arm (calibration) and measured on the other half:

``value``
    a number's value (either direction), thresholded;
``projection``
    an array's projection on the difference of its mean with the canary in and
    out over the calibration runs, thresholded;
``frequency``
    anything else (a text, a flag, a field present in some runs only): the log
    ratio of how often each value came with the canary in and out in
    calibration, thresholded.

The threshold (and direction) is the one with the best bound on the
calibration runs. On the test runs the true and false positive rates give,
with two-sided Clopper-Pearson intervals at ``--confidence`` (both hold
together at that level), an empirical lower bound on epsilon
(Jagielski, Ullman and Oprea 2020; Nasr et al. 2021)::

    max(log((TPR_lower - delta) / FPR_upper), log((1 - FPR_upper - delta) / (1 - TPR_lower)))

beside the epsilon the site's accountant reported (its replies' ``epsilon``
and ``delta``: the site's total after the run). A field whose bound exceeds
the accounted epsilon is *flagged*: it says more about one record than the
budget allows, so it is not the accounted release (or the accounting is
wrong). The confidence holds per field; over many fields a chance flag is
possible only for a field whose true privacy loss is near the accounted one.

What it does not show: a bound of 0 is no proof of privacy, only that these
attacks, with this canary and this many runs, found nothing. The bound can
never exceed what the test runs can resolve (``resolution``: every test run
told apart); a field is flagged only when that exceeds the accounted epsilon.
The audit observes the plain path (no secure aggregation), the strongest
view a server can have of one site; the site's size bucket is public by
design, so the site's examples with and without the canary must share one
(:func:`fedseal.common.buckets.size_bucket`). See ``docs/audit.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flwr.app import Message

from fedseal.common import egress
from fedseal.common.buckets import size_bucket
from fedseal.common.cli_args import add_config_options, config_from_args
from fedseal.common.config import ConfigError, FedConfig, load_toml
from fedseal.common.console import setup_run_logging
from fedseal.common.data import Examples, read_examples, write_examples
from fedseal.common.records import ROUND_KEY
from fedseal.common.synthetic import LABEL_NAMES, POSITIVE, synthetic_examples
from fedseal.simulations.local_grid import LocalGrid

log = logging.getLogger("fedseal")  # progress lines: the console
detail = logging.getLogger("fedseal.audit")  # the log file

AUDIT_LOG = "audit.log"
DEFAULT_OUT = "fedseal-audit"
DEFAULT_RUNS = 40
DEFAULT_EPSILON = 0.5
DEFAULT_SITE_EXAMPLES = 100
DEFAULT_CONFIDENCE = 0.95
CANARY_MARK = "zqcanary"
"""A word no task uses: the default canary's text starts with it."""
SITE = "audited-site"
REPLY = "reply"  # the pseudo-field naming the reply type that came back
# Settings that belong to a federation of many sites or to the server alone: the audit
# runs one site on the plain path and sets these itself.
AUDIT_SETS = (
    "clients",
    "min_clients",
    "fraction",
    "partition",
    "alpha",
    "secagg",
    "secagg_k",
    "secagg_threshold",
    "dp",
    "eval",
    "eval_max_examples",
    "tensorboard",
    "timeout",
)
# Run settings whose default differs in an audit (its own options below say so).
AUDIT_DEFAULTS = {"epsilon": DEFAULT_EPSILON, "out": DEFAULT_OUT, "federated_eval": True}


# -- statistics ------------------------------------------------------------------------------


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P[Binomial(n, p) >= k]``, summed exactly in log space."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def _root(increasing: Callable[[float], float]) -> float:
    """The ``p`` in [0, 1] where ``increasing(p)`` crosses 0 (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if increasing(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


@cache
def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """The two-sided ``1 - alpha`` Clopper-Pearson interval of a proportion, ``k`` in ``n``.

    Each end errs with probability at most ``alpha / 2``:
    ``P[Binomial(n, lower) >= k] = alpha / 2`` and
    ``P[Binomial(n, upper) <= k] = alpha / 2`` (0 and 1 at the extremes).

    Raises
    ------
    ValueError
        If ``k`` is not in ``[0, n]`` or ``alpha`` not in (0, 1).
    """
    if not 0 <= k <= n or n < 1 or not 0 < alpha < 1:
        raise ValueError(f"need 0 <= k <= n, n >= 1 and 0 < alpha < 1; got k={k}, n={n}, alpha={alpha}")
    lower = 0.0 if k == 0 else _root(lambda p: binomial_tail(k, n, p) - alpha / 2)
    upper = 1.0 if k == n else _root(lambda p: binomial_tail(k + 1, n, p) - (1 - alpha / 2))
    return lower, upper


class Bound(NamedTuple):
    """An empirical epsilon lower bound and the rates it comes from."""

    tpr_lower: float
    fpr_upper: float
    epsilon: float  # 0 when the rates show nothing


def epsilon_bound(
    true_pos: int, n_in: int, false_pos: int, n_out: int, delta: float, confidence: float
) -> Bound:
    """The epsilon ``true_pos`` of ``n_in`` and ``false_pos`` of ``n_out`` prove at ``confidence``.

    An (epsilon, delta)-DP mechanism lets no test have ``TPR > e^eps FPR + delta``
    nor ``1 - FPR > e^eps (1 - TPR) + delta``. Both use only the lower end of
    the TPR's and the upper end of the FPR's Clopper-Pearson interval (two-sided
    at ``confidence``: each end errs with probability ``(1 - confidence) / 2``,
    so both hold together at ``confidence``), and the larger of
    ``log((TPR_lower - delta) / FPR_upper)`` and
    ``log((1 - FPR_upper - delta) / (1 - TPR_lower))`` is a lower bound on
    epsilon; below 0 it is reported as 0.
    """
    alpha = 1.0 - confidence
    tpr_lower = clopper_pearson(true_pos, n_in, alpha)[0]
    fpr_upper = clopper_pearson(false_pos, n_out, alpha)[1]
    bounds = [0.0]
    if tpr_lower - delta > 0:
        bounds.append(math.log((tpr_lower - delta) / fpr_upper))
    if 1 - fpr_upper - delta > 0 and tpr_lower < 1:
        bounds.append(math.log((1 - fpr_upper - delta) / (1 - tpr_lower)))
    return Bound(tpr_lower, fpr_upper, max(bounds))


# -- the site's runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """The record planted at the site: its text and its label's name."""

    text: str
    label: str


def default_canary(labels: Sequence[str]) -> Canary:
    """The synthetic task's positive words after a marker word, labelled ``negative`` (or the
    first of ``labels`` where there is no ``negative``).

    In the default task that is a mislabelled outlier, whose gradient points
    against every other example's.
    """
    label = LABEL_NAMES[0] if LABEL_NAMES[0] in labels else labels[0]
    return Canary(f"{CANARY_MARK} " + " ".join(POSITIVE[:8]), label)


class Observed(NamedTuple):
    """One field of one run, as the server received it: why it may leave (the
    :class:`~fedseal.common.egress.Kind`, or ``reply``) and its value (None if absent)."""

    kind: str
    value: Any


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every reply with its request's message type and round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[tuple[str, int, Message]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver ``messages`` (:meth:`LocalGrid.send_and_receive`) and record the replies."""
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        asked = {m.metadata.message_id: (m.metadata.message_type, _config_round(m)) for m in messages}
        self.replies += [(*asked[r.metadata.reply_to_message_id], r) for r in replies]
        return replies


def serve(
    cfg: FedConfig, grid: LocalGrid, initial: dict[str, np.ndarray]
) -> dict[int, dict[str, np.ndarray]]:
    """An honest server's run with ``grid``'s sites, from ``initial`` weights.

    It sends what :func:`fedseal.server.app.run_federation` sends (each
    round's global weights and config, the federated evaluation requests) and
    aggregates the replies the same way, leaving out what no site sees (central
    evaluation, checkpoints, the report). Returns each round's update template
    (what a reply's update must match).
    """
    from fedseal.common.vote import round_clip, update_template
    from fedseal.common.weights import weight_range
    from fedseal.server.aggregate import RoundSums, send, sum_plain
    from fedseal.server.app import federated_evaluate, next_weights, round_content
    from fedseal.server.identity import SiteNames
    from fedseal.server.strategy import make_strategy

    weights, strategy, names = dict(initial), make_strategy(cfg), SiteNames()
    job, nodes = uuid.uuid4().hex[:16], grid.get_node_ids()
    templates = {}
    for server_round in range(1, cfg.rounds + 1):
        templates[server_round] = update_template(weights, cfg, server_round)
        replies, sent = send(
            grid, nodes, round_content(weights, cfg, job, server_round), "train", cfg.timeout
        )
        sums = sum_plain(
            replies,
            templates[server_round],
            RoundSums(bytes_sent=sent),
            egress.train_reply_type(cfg, server_round),
            names,
            weight_range(cfg, server_round),
            round_clip(cfg, server_round),
        )
        weights, _ = next_weights(weights, sums, cfg, strategy, server_round)
        if cfg.federated_eval:
            federated_evaluate(grid, nodes, weights, cfg, job, server_round, names)
    return templates


def _config_round(message: Message) -> int:
    """The server round a message of the server's says it belongs to."""
    value = message.content["config"][ROUND_KEY]
    if not isinstance(value, int):
        raise TypeError(f"the server's message carries round {value!r}, not an integer")
    return value


def _reply_type(message_type: str, reply: Message, cfg: FedConfig, server_round: int) -> egress.ReplyType:
    if egress.refusal_of(reply) is not None:
        return egress.REFUSAL_REPLY
    if message_type == "evaluate":
        return egress.EVALUATION
    return egress.train_reply_type(cfg, server_round)


def observe(
    cfg: FedConfig, replies: Iterable[tuple[str, int, Message]], templates: dict[int, dict[str, np.ndarray]]
) -> dict[str, Observed]:
    """Every field of every reply, named ``"<message type> r<round> <record>[<key>]"``.

    Each reply is parsed as the server parses it (:func:`fedseal.common.egress.parse`,
    every declared field of its type); an update field appears whole
    (``update[*]``, its arrays end to end) and array by array. The pseudo-field
    ``"<message type> r<round> reply"`` names the reply type that came back (a
    refusal, a Flower error, or a reply that does not parse, by its reason code).
    """
    seen: dict[str, Observed] = {}
    for message_type, server_round, reply in replies:
        where = f"{message_type} r{server_round}"
        try:
            if reply.has_error():
                raise egress.ReplyError(egress.REPLY_ERROR, "Flower's error reply")
            reply_type = _reply_type(message_type, reply, cfg, server_round)
            values = egress.parse(reply_type, reply, template=templates[server_round])
        except egress.ReplyError as exc:
            seen[f"{where} {REPLY}"] = Observed(REPLY, exc.reason)
            continue
        seen[f"{where} {REPLY}"] = Observed(REPLY, reply_type.name)
        for fld in reply_type.fields:
            value = values.get(fld.record, {}).get(fld.key)
            if fld.form is egress.Form.ARRAYS and value is not None:
                # One float32 vector per update; each array's field is a view into it.
                arrays = value
                value = np.concatenate([np.ravel(a) for a in arrays.values()]).astype(np.float32)
                start = 0
                for name, array in arrays.items():
                    seen[f"{where} {fld.record}[{name}]"] = Observed(
                        fld.kind.value, value[start : start + array.size]
                    )
                    start += array.size
            seen[f"{where} {fld.record}[{fld.key}]"] = Observed(fld.kind.value, value)
    return seen


def site_node_config(cfg: FedConfig, data: Path, folder: Path) -> dict[str, Any]:
    """A deployed site's node config: its data, a fresh ledger (key kept apart) and a policy
    that lets the audit's honest server run (plain path, federated evaluation as the run asks)."""
    state, secrets = folder / "state", folder / "secrets"
    state.mkdir(parents=True)
    secrets.mkdir()
    return {
        "data-path": str(data),
        "site-name": SITE,
        "epsilon": cfg.epsilon,
        "delta": cfg.delta,
        "ledger-path": str(state / "ledger.json"),
        "ledger-key": str(secrets / "ledger.key"),
        "device": cfg.device,
        "require-secagg": False,
        "federated-eval": "on" if cfg.federated_eval else "off",
        "allow-model": cfg.model,
        "labels": ",".join(cfg.labels),
        "text-column": cfg.text_column,
        "label-column": cfg.label_column,
    }


def run_site(cfg: FedConfig, data: Path, folder: Path, initial: dict[str, np.ndarray]) -> dict[str, Observed]:
    """One whole run of the site on ``data`` (fresh ledger, fresh noise): what the server saw.

    ``folder`` (the site's state for this run) is removed afterwards.
    """
    grid = RecordingGrid(1, node_configs=[site_node_config(cfg, data, folder)])
    try:
        templates = serve(cfg, grid, initial)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return observe(cfg, grid.replies, templates)


# -- attacks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldResult:
    """What the audit found for one field."""

    field: str
    kind: str  # the field's egress Kind, or "reply"
    attack: str  # value, projection or frequency
    true_positives: int
    test_in: int
    false_positives: int
    test_out: int
    tpr_lower: float
    fpr_upper: float
    epsilon_lower_bound: float
    flagged: bool


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _token(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, (str, bool)):
        return repr(value)
    return "present"  # a number or an array, in a field other runs lack


def field_scores(
    values_in: Sequence[Any], values_out: Sequence[Any], calibration: int
) -> tuple[str, np.ndarray, np.ndarray]:
    """The distinguisher for one field: its name and each run's score, canary in and out.

    The first ``calibration`` runs of each arm fit it (the direction of a
    projection, the frequencies of values); the scores of all runs come back.
    """
    both = [*values_in, *values_out]
    if all(isinstance(v, np.ndarray) for v in both) and len({v.shape for v in both}) == 1:
        direction = np.zeros(both[0].shape)  # summed run by run: an update can be large
        for v in values_in[:calibration]:
            direction += v / calibration
        for v in values_out[:calibration]:
            direction -= v / calibration
        project = np.array([float(np.dot(v, direction)) for v in both])
        return "projection", project[: len(values_in)], project[len(values_in) :]
    if all(_is_number(v) for v in both):
        return ("value", np.array(values_in, dtype=np.float64), np.array(values_out, dtype=np.float64))
    tokens_in, tokens_out = [_token(v) for v in values_in], [_token(v) for v in values_out]

    def frequency(token: str) -> float:
        seen_in = tokens_in[:calibration].count(token)
        seen_out = tokens_out[:calibration].count(token)
        return math.log((seen_in + 0.5) / (seen_out + 0.5))

    return (
        "frequency",
        np.array([frequency(t) for t in tokens_in]),
        np.array([frequency(t) for t in tokens_out]),
    )


def choose_threshold(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float
) -> tuple[float, float]:
    """``(sign, cut)``: guess "canary in" when ``sign * score > cut``.

    The pair with the best :func:`epsilon_bound` on these (calibration) scores;
    among equals (all 0 where nothing separates), the one with the largest
    ``TPR - FPR``, then the first.
    """
    best, choice = (-1.0, -1.0), (1.0, math.inf)
    for sign in (1.0, -1.0):
        signed_in, signed_out = sign * scores_in, sign * scores_out
        values = np.unique(np.concatenate([signed_in, signed_out]))
        for cut in np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2]):
            true_pos, false_pos = int(np.sum(signed_in > cut)), int(np.sum(signed_out > cut))
            merit = (
                epsilon_bound(
                    true_pos, len(signed_in), false_pos, len(signed_out), delta, confidence
                ).epsilon,
                true_pos / len(signed_in) - false_pos / len(signed_out),
            )
            if merit > best:
                best, choice = merit, (sign, float(cut))
    return choice


def attack_field(
    name: str,
    kind: str,
    values_in: Sequence[Any],
    values_out: Sequence[Any],
    calibration: int,
    delta: float,
    confidence: float,
    accounted: float,
) -> FieldResult:
    """Fit the field's distinguisher and threshold on the calibration runs, bound on the rest."""
    attack, scores_in, scores_out = field_scores(values_in, values_out, calibration)
    sign, cut = choose_threshold(scores_in[:calibration], scores_out[:calibration], delta, confidence)
    test_in, test_out = sign * scores_in[calibration:], sign * scores_out[calibration:]
    true_pos, false_pos = int(np.sum(test_in > cut)), int(np.sum(test_out > cut))
    bound = epsilon_bound(true_pos, len(test_in), false_pos, len(test_out), delta, confidence)
    return FieldResult(
        name,
        kind,
        attack,
        true_pos,
        len(test_in),
        false_pos,
        len(test_out),
        round(bound.tpr_lower, 4),
        round(bound.fpr_upper, 4),
        round(bound.epsilon, 4),
        bound.epsilon > accounted,
    )


def accounted_budget(runs: Iterable[dict[str, Observed]]) -> tuple[float, float]:
    """The largest ``epsilon`` and ``delta`` any reply reported: the site's accountant's total."""
    epsilon = delta = 0.0
    for run in runs:
        for name, seen in run.items():
            if _is_number(seen.value) and name.endswith("[epsilon]"):
                epsilon = max(epsilon, seen.value)
            if _is_number(seen.value) and name.endswith("[delta]"):
                delta = max(delta, seen.value)
    return epsilon, delta


# -- the audit --------------------------------------------------------------------------------


def site_examples(cfg: FedConfig, count: int) -> Examples:
    """The audited site's examples without the canary: the first ``count`` of ``cfg.train``,
    or ``count`` sentences of the synthetic task (seeded by ``cfg.seed``)."""
    if not cfg.train:
        return synthetic_examples(count, seed=cfg.seed)
    examples = read_examples(
        cfg.train, text_column=cfg.text_column, label_column=cfg.label_column, label_names=cfg.labels or None
    )
    if len(examples) < count:
        raise ConfigError(f"{cfg.train} has {len(examples)} examples, fewer than --site-examples {count}")
    return examples.subset(range(count))


def with_canary(examples: Examples, canary: Canary) -> Examples:
    """``examples`` and the canary after them.

    Raises
    ------
    ConfigError
        If the canary's label is not one of the examples' labels, or the canary
        moves the site into another size bucket (public by design, so the audit
        would find the bucket, not a leak).
    """
    if canary.label not in examples.label_names:
        raise ConfigError(
            f"the canary's label {canary.label!r} is not one of the site's labels "
            f"{list(examples.label_names)}; pass --canary-label"
        )
    if size_bucket(len(examples)) != size_bucket(len(examples) + 1):
        raise ConfigError(
            f"a site of {len(examples)} examples moves to another size bucket with "
            "the canary; the bucket is public by design: choose --site-examples "
            "so that it plus one is not a power of two"
        )
    return Examples(
        [*examples.texts, canary.text],
        [*examples.labels, examples.label_names.index(canary.label)],
        examples.label_names,
        f"{examples.source} + canary",
    )


def audit(
    cfg: FedConfig, examples: Examples, canary: Canary, runs: int, confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, Any]:
    """Run the site ``runs`` times with the canary in and ``runs`` times out; attack every field.

    ``cfg`` is the run (its ``out`` folder holds the site's two data files and
    each run's state while it runs); ``examples`` the site's data without the
    canary. Runs alternate in and out; the first half of each arm calibrates.
    Returns the JSON-ready result: the settings, the accounted budget, the
    resolution (the largest bound the test runs can show) and one entry per
    field, flagged where its bound exceeds the accounted epsilon.

    Raises
    ------
    ConfigError
        If ``runs`` is below 4, or the canary does not fit the site
        (:func:`with_canary`).
    """
    from fedseal.common.model import build_model, trainable_state
    from fedseal.common.records import to_numpy_state

    if runs < 4:
        raise ConfigError(f"--runs must be at least 4 (half of each arm calibrates), got {runs}")
    out = Path(cfg.out)
    arms = {"in": with_canary(examples, canary), "out": examples}
    files = {
        arm: write_examples(
            data, out / f"site-canary-{arm}.jsonl", text_column=cfg.text_column, label_column=cfg.label_column
        )
        for arm, data in arms.items()
    }
    initial = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    seen: dict[str, list[dict[str, Observed]]] = {"in": [], "out": []}
    started = time.monotonic()
    for i in range(2 * runs):
        arm = ("in", "out")[i % 2]
        run_started = time.monotonic()
        seen[arm].append(run_site(cfg, files[arm], out / f"run-{i}", initial))
        log.info("run %d/%d (canary %s): %.1fs", i + 1, 2 * runs, arm, time.monotonic() - run_started)
    seconds = time.monotonic() - started
    epsilon, delta = accounted_budget([*seen["in"], *seen["out"]])
    calibration = runs // 2
    names = list(dict.fromkeys(name for run in [*seen["in"], *seen["out"]] for name in run))
    fields = []
    for name in names:
        kind = next(run[name].kind for run in [*seen["in"], *seen["out"]] if name in run)
        values = {arm: [run[name].value if name in run else None for run in seen[arm]] for arm in seen}
        fields.append(
            attack_field(name, kind, values["in"], values["out"], calibration, delta, confidence, epsilon)
        )
    test = runs - calibration
    return {
        "command": "fedseal audit",
        "model": cfg.model,
        "finetune": cfg.finetune,
        "rounds": cfg.rounds,
        "federated_eval": cfg.federated_eval,
        "site_examples": len(examples),
        "data": cfg.train or "synthetic",
        "canary": asdict(canary),
        "runs_per_arm": runs,
        "calibration_runs_per_arm": calibration,
        "test_runs_per_arm": test,
        "confidence": confidence,
        "accounted": {"epsilon": epsilon, "delta": delta, "asked_epsilon": cfg.epsilon},
        "resolution": round(epsilon_bound(test, test, 0, test, delta, confidence).epsilon, 4),
        "max_bound": max((f.epsilon_lower_bound for f in fields), default=0.0),
        "flagged": [f.field for f in fields if f.flagged],
        "fields": [asdict(f) for f in fields],
        "seconds": round(seconds, 1),
        "seconds_per_run": round(seconds / (2 * runs), 2),
    }


def table(result: dict[str, Any]) -> list[str]:
    """The console's summary of an audit result: one line per field, flagged ones marked."""
    accounted = result["accounted"]
    lines = [
        f"fedseal audit: {result['model']} ({result['finetune']}), {result['rounds']} rounds, "
        f"a site of {result['site_examples']} examples ({result['data']}) with and without a "
        f"canary; {result['runs_per_arm']} runs each ({result['test_runs_per_arm']} to test)",
        f"  accounted epsilon {accounted['epsilon']:.3f} (delta {accounted['delta']:.3g}); "
        f"the most {result['test_runs_per_arm']} + {result['test_runs_per_arm']} test runs can "
        f"show: {result['resolution']:.3f} at {result['confidence']:.0%} confidence",
        f"  {'field':44s} {'kind':16s} {'attack':10s} {'TP':>5s} {'FP':>5s} {'eps >=':>7s}",
    ]
    for f in result["fields"]:
        mark = "  FLAGGED" if f["flagged"] else ""
        lines.append(
            f"  {f['field'][:44]:44s} {f['kind']:16s} {f['attack']:10s} "
            f"{f['true_positives']:>2d}/{f['test_in']:<2d} "
            f"{f['false_positives']:>2d}/{f['test_out']:<2d} "
            f"{f['epsilon_lower_bound']:7.3f}{mark}"
        )
    verdict = (
        f"{len(result['flagged'])} field(s) say more than the accounted epsilon: "
        + ", ".join(result["flagged"])
        if result["flagged"]
        else f"no field's bound exceeds the accounted epsilon (largest {result['max_bound']:.3f})"
    )
    lines.append(f"  {verdict}; {result['seconds']:.0f}s ({result['seconds_per_run']:.2f}s a run)")
    return lines


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedseal audit``: the run's settings and the audit's own."""
    add_config_options(parser, skip=(*AUDIT_SETS, *AUDIT_DEFAULTS))
    group = parser.add_argument_group("audit")
    group.add_argument(
        "--epsilon",
        type=float,
        metavar="FLOAT",
        help="the run's epsilon, and the audited site's total: small, so a leak "
        f"stands out above it (default: {DEFAULT_EPSILON})",
    )
    group.add_argument(
        "--federated-eval",
        action=argparse.BooleanOptionalAction,
        help="also send the site federated evaluation requests each round, and "
        "attack its answers (default: on)",
    )
    group.add_argument(
        "--out",
        metavar="DIR",
        help="the audit's folder: its log, the site's data with and without the "
        f"canary, each run's site state while it runs (default: {DEFAULT_OUT})",
    )
    group.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        metavar="R",
        help="runs of the site with the canary in, and as many with it out; the "
        f"first half of each calibrates the attacks, the rest test them "
        f"(default: {DEFAULT_RUNS})",
    )
    group.add_argument(
        "--site-examples",
        type=int,
        default=DEFAULT_SITE_EXAMPLES,
        metavar="N",
        help="examples at the audited site before the canary: N sentences of the "
        "synthetic task, or the first N of --train; N + 1 must not be a "
        f"power of two (default: {DEFAULT_SITE_EXAMPLES})",
    )
    group.add_argument(
        "--canary-text",
        metavar="TEXT",
        help="the planted record's text (default: a marker word and the synthetic task's positive words)",
    )
    group.add_argument(
        "--canary-label",
        metavar="LABEL",
        help="the planted record's label, one of the site's labels; choose one its "
        "text contradicts (default: negative, else the first label)",
    )
    group.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        metavar="C",
        help=f"confidence of each field's Clopper-Pearson bound, in (0, 1) (default: {DEFAULT_CONFIDENCE})",
    )
    group.add_argument(
        "--json", metavar="FILE", help="also write the result (the JSON printed on stdout) to FILE"
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every log line (the site's, the server's) on the console; "
        f"without it they go to <out>/{AUDIT_LOG} only",
    )


class _QuietRuns(logging.Filter):
    """Keep the site's and the server's lines off the quiet console: the audit runs them
    dozens of times (they stay in the log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for ``fedseal.client`` and ``fedseal.server`` records below ERROR."""
        return record.levelno >= logging.ERROR or record.name.split(".")[:2] not in (
            ["fedseal", "client"],
            ["fedseal", "server"],
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal audit``: exit status 1 when a field is flagged."""
    from fedseal.common.cli import command_parser

    args = command_parser("audit").parse_args(argv)
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {args.confidence}")
    in_file = load_toml(args.config) if args.config else {}
    defaults = {
        k: v
        for k, v in AUDIT_DEFAULTS.items()
        if getattr(args, k) is None and k not in in_file and k.replace("_", "-") not in in_file
    }
    cfg = config_from_args(args, {**defaults, "clients": 1, "min_clients": 1, "secagg": False, "dp": True})
    log_file = setup_run_logging(Path(cfg.out) / AUDIT_LOG, args.verbose)
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(_QuietRuns())
    examples = site_examples(cfg, args.site_examples)
    cfg = cfg.replace(labels=list(cfg.labels or examples.label_names))
    canary = default_canary(cfg.labels)
    canary = Canary(args.canary_text or canary.text, args.canary_label or canary.label)
    log.info("fedseal audit: %d runs with the canary, %d without; log: %s", args.runs, args.runs, log_file)
    result = audit(cfg, examples, canary, args.runs, args.confidence)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    for line in table(result):
        log.info(line)
    return 1 if result["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
