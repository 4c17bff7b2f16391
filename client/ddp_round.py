"""A site's round under distributed noise (``dp-noise = distributed``, docs/ddp.md).

Each round is one step of the sampled Gaussian mechanism over every site's
records: the site draws a Poisson sample of its records at its rate ``q``, sums
their clipped rows (the statistics round, :func:`fedseal.client.probe.statistics_rows`)
or their clipped gradients of the head's loss (every later round), encodes the
sum with its share of the discrete Gaussian noise into Z_2^32
(:func:`fedseal.common.ddp.encode_share`) and sends it masked by SecAgg+
(:func:`fedseal.client.secagg.masked_vector`). Nothing else about the round
leaves: the reply is the declared ``secagg.masked_input`` type, the masked
share and the committed spend.

The site's checks, in order, before anything is encoded:

* :func:`site_plan`: the job's grant (:func:`fedseal.client.budget.grant`) and
  the noise multiplier ``z`` that spends it over the run's rounds at the site's
  rate (:func:`fedseal.common.ddp.calibrate_noise_multiplier`);
* :func:`round_mechanism`: the server's encoding parses and fits the round,
  and :func:`fedseal.common.ddp.check_share` holds its share scale against the
  site's own ``min-cohort`` and ``max-colluders``: ``h = min_cohort -
  max_colluders`` honest shares of that scale must carry ``z`` times a record's
  sensitivity; else ``policy.noise_share`` (public values only);
* the job's epsilon after this step, recomputed from every step's recorded
  mechanism (:func:`job_epsilon`), stays within the grant.

The stage-0 ``train`` message runs all three without recording (a round that
never reaches the masked input costs nothing); the masked-input stage runs
them again once the shares routed to the site have opened and checked
(:func:`fedseal.client.secagg.open_routed`, so malformed ones cost nothing
either), records the step's mechanism in the ledger, and only then encodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from fedseal.client import cache, secagg
from fedseal.client.budget import grant
from fedseal.client.ledger import Budget, PrivacyLedger
from fedseal.client.probe import statistics_rows
from fedseal.client.randomness import fresh_generator
from fedseal.client.reply import plan_metrics, status
from fedseal.client.site import feature_cache
from fedseal.client.spend import commit_round, steps_done
from fedseal.client.training import Asked, Prepared
from fedseal.common import ddp, ddp_wire, egress
from fedseal.common.config import FedConfig
from fedseal.common.privacy import sample_rate_for
from fedseal.common.refusals import Code, Refusal
from fedseal.common.secagg_wire import COMPLAINTS, NODES, Y, unpack_ids
from fedseal.common.secagg_wire import RECORD as SECAGG_RECORD
from fedseal.common.vote import is_adapter_round

HISTORY = "fedseal.ddp.history"  # context.state: the steps' mechanisms of a site without a ledger
PLAN = "fedseal.ddp.plan"  # context.state: the job's calibrated noise multiplier
_MECHANISM_FIELDS = ("share_sigma", "honest_shares", "l2_sensitivity", "dim")


@dataclass(frozen=True)
class SitePlan:
    """A job's distributed-noise plan at a site: its grant and the noise that spends it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float


def site_plan(asked: Asked, prepared: Prepared, context: Context, *, record: bool) -> SitePlan:
    """The job's grant and the noise multiplier that spends it over the run's rounds.

    The calibration (seconds of PLD evaluations) is remembered in the run's
    ``Context.state``: a deployed site answers each message in a fresh process.

    Raises
    ------
    fedseal.common.refusals.Refusal
        ``plan.infeasible`` if no noise multiplier meets the grant (or delta is
        not below ``1/n`` for the site's size bucket), or what
        :func:`fedseal.client.budget.grant` raises.
    """
    cfg, site = asked.cfg, asked.site
    rate = sample_rate_for(prepared.bucket, prepared.recipe.batch_size)

    def calibrate(epsilon: float, delta: float) -> float:
        if delta >= 1.0 / (2 * prepared.bucket):
            raise Refusal(
                Code.PLAN_INFEASIBLE,
                f"delta={delta} is not below 1/n for a site of "
                f"{prepared.bucket} to {2 * prepared.bucket - 1} examples",
                setting="delta",
                asked=cfg.delta,
            )
        key = repr((epsilon, delta, rate, cfg.rounds))
        if PLAN in context.state and context.state[PLAN].get("key") == key:
            return float(str(context.state.config_records[PLAN]["noise-multiplier"]))
        try:
            z = ddp_wire.noise_multiplier(epsilon, delta, rate, cfg.rounds)
        except ddp.DdpError as exc:
            raise Refusal(Code.PLAN_INFEASIBLE, str(exc), setting="epsilon", asked=cfg.epsilon) from None
        context.state[PLAN] = ConfigRecord({"key": key, "noise-multiplier": z})
        return z

    granted = grant(
        prepared.ledger,
        asked.job,
        cfg.epsilon,
        cfg.delta,
        site.policy,
        Budget(site.epsilon, site.delta),
        check=calibrate,
        record=record,
    )
    return SitePlan(
        calibrate(granted.epsilon, granted.delta), rate, cfg.rounds, granted.epsilon, granted.delta
    )


def round_mechanism(
    asked: Asked, prepared: Prepared, content: RecordDict, plan: SitePlan, cohort: int
) -> tuple[ddp.Encoding, bytes, ddp.DdgMechanism]:
    """The round's encoding and seed, checked, and the mechanism this site's step is.

    Raises
    ------
    fedseal.common.refusals.Refusal
        ``message.ddp`` if the encoding is missing, malformed or not this
        round's shape; ``policy.noise_share`` if its share scale or the cohort
        is too small for the site's policy.
    """
    try:
        encoding, seed = ddp_wire.encoding_from_record(content[ddp_wire.RECORD])
    except (KeyError, TypeError, ddp.DdpError) as exc:
        raise Refusal(
            Code.MESSAGE_DDP, f"the round's distributed-noise encoding is missing or invalid: {exc}"
        ) from None
    shape = ddp_wire.round_shape(asked.cfg, prepared.global_state, asked.round)
    if (encoding.dim, encoding.clip) != shape:
        raise Refusal(
            Code.MESSAGE_DDP,
            f"the round's encoding has dimension {encoding.dim} and "
            f"clip {encoding.clip}; this round's vectors have {shape[0]} and "
            f"{shape[1]}",
            round=asked.round,
        )
    policy = asked.site.policy
    try:
        mechanism = ddp.check_share(
            encoding,
            noise_multiplier=plan.noise_multiplier,
            min_cohort=policy.min_cohort,
            max_colluders=policy.max_colluders,
            cohort=cohort,
        )
    except ddp.ShareRefusal as exc:
        raise Refusal(
            Code.POLICY_NOISE_SHARE,
            str(exc),
            setting="max-colluders",
            limit=policy.max_colluders,
            round=asked.round,
        ) from None
    return encoding, seed, mechanism


def _mechanism_record(mechanism: ddp.DdgMechanism) -> dict[str, float]:
    return {k: float(v) for k, v in asdict(mechanism).items()}


def _history(ledger: PrivacyLedger | None, context: Context, job: str) -> list[ddp.DdgSteps]:
    """The job's steps so far with their recorded mechanisms (ledger, or the run's state)."""
    if ledger is None:
        if HISTORY not in context.state:
            return []
        saved = context.state[HISTORY]
        return [
            ddp.DdgSteps(ddp.DdgMechanism(float(s), int(h), float(l2), int(d)), float(q), 1)
            for s, h, l2, d, q in zip(*(saved[k] for k in (*_MECHANISM_FIELDS, "rate")))
        ]
    out, before = [], 0
    for entry in ledger.entries:
        if entry.run != job:
            continue
        if entry.mechanism is None:
            raise Refusal(
                Code.PLAN_CHANGED,
                f"job {job} has rounds recorded without a "
                "distributed-noise mechanism (it started under local noise); start a "
                "new run",
            )
        m = entry.mechanism
        out.append(
            ddp.DdgSteps(
                ddp.DdgMechanism(
                    m["share_sigma"], int(m["honest_shares"]), m["l2_sensitivity"], int(m["dim"])
                ),
                entry.sample_rate,
                entry.steps - before,
            )
        )
        before = entry.steps
    return out


def _remember(context: Context, mechanism: ddp.DdgMechanism, rate: float) -> None:
    """Add a step to the run's state (a site without a ledger)."""
    kept = context.state.config_records[HISTORY] if HISTORY in context.state else ConfigRecord()
    saved: dict[str, list[float]] = {
        k: [float(x) for x in cast(list, kept.get(k, []))] for k in (*_MECHANISM_FIELDS, "rate")
    }
    for key, value in (*_mechanism_record(mechanism).items(), ("rate", rate)):
        saved[key].append(float(value))
    context.state[HISTORY] = ConfigRecord(dict(saved))


def job_epsilon(history: list[ddp.DdgSteps], delta: float) -> float:
    """The job's epsilon after ``history``: consecutive steps of one mechanism composed at once."""
    merged: list[ddp.DdgSteps] = []
    for h in history:
        if merged and (merged[-1].mechanism, merged[-1].sample_rate) == (h.mechanism, h.sample_rate):
            merged[-1] = ddp.DdgSteps(h.mechanism, h.sample_rate, merged[-1].steps + h.steps)
        else:
            merged.append(h)
    return _epsilon(tuple(merged), delta)


@lru_cache(maxsize=256)  # sites of one run share mechanisms; the PLD takes a second
def _epsilon(history: tuple[ddp.DdgSteps, ...], delta: float) -> float:
    return ddp.epsilon_spent(history, delta)


def _cohort(content: RecordDict) -> int:
    return len(unpack_ids(content[SECAGG_RECORD][NODES]))  # admit() checked it parses


def check(asked: Asked, prepared: Prepared, content: RecordDict, context: Context) -> None:
    """Stage 0: refuse now, before keys are sent, a round this site could not take part in.

    Nothing is recorded. Raises what :func:`site_plan`, :func:`round_mechanism`
    and the budget check of :func:`masked_input` raise.
    """
    plan = site_plan(asked, prepared, context, record=False)
    _, _, mechanism = round_mechanism(asked, prepared, content, plan, _cohort(content))
    _check_budget(asked, prepared, context, plan, mechanism)


def _check_budget(
    asked: Asked, prepared: Prepared, context: Context, plan: SitePlan, mechanism: ddp.DdgMechanism
) -> float:
    history = _history(prepared.ledger, context, asked.job)
    epsilon = job_epsilon([*history, ddp.DdgSteps(mechanism, plan.sample_rate, 1)], plan.delta)
    if epsilon > plan.epsilon:
        raise Refusal(
            Code.BUDGET_ROUND,
            f"this step would bring job {asked.job}'s epsilon to "
            f"{epsilon:.4f}, over its grant of {plan.epsilon:g} at this site",
            round=asked.round,
        )
    return epsilon


def clipped_sum(
    model, feats: torch.Tensor, labels: torch.Tensor, clip: float, rate: float, statistics: bool
) -> np.ndarray:
    """The sum over a fresh Poisson sample (rate ``rate``) of the records' clipped vectors.

    Statistics round: the rows of :func:`fedseal.client.probe.statistics_rows` (norm at
    most 1). Otherwise each record's gradient of the cross-entropy on the head's
    weights, ``(p - y) x^T`` over the standardised features, clipped to L2 norm
    ``clip``, flattened as ``classifier.weight`` is (labels by features).
    """
    gen = fresh_generator(torch.device("cpu"))
    keep = torch.rand(len(feats), generator=gen) < rate
    num_labels = int(model.classifier.out_features)
    with torch.no_grad():
        if statistics:
            rows = statistics_rows(feats[keep], labels[keep], num_labels)
            return rows.sum(dim=0).double().numpy()
        x = model.standardise(feats[keep])
        residual = torch.softmax(model.classifier(x), dim=1) - torch.nn.functional.one_hot(
            labels[keep], num_labels
        ).to(x.dtype)
        norms = residual.norm(dim=1) * x.norm(dim=1)
        factor = (clip / norms.clamp(min=1e-12)).clamp(max=1.0)
        return ((residual * factor[:, None]).T @ x).reshape(-1).double().numpy()


def adapter_sum(
    cfg: FedConfig,
    prepared: Prepared,
    data: TensorDataset,
    clip: float,
    rate: float,
    server_round: int,
    device: torch.device,
    cache_dir: Path | None,
) -> np.ndarray:
    """An LP-FT adapter round's vector: the clipped per-record gradients on the adapters and the
    head's weights (:func:`fedseal.common.ddp_wire.step_keys`) over a fresh Poisson sample, on
    the site's cached states below the adapters (:mod:`fedseal.common.hidden_cache`)."""
    from fedseal.client.lora_round import clipped_gradient_sum
    from fedseal.client.lpft import states_below_adapters

    model = prepared.model
    hidden = states_below_adapters(model, data, device, cache_dir)
    keys = ddp_wire.step_keys(prepared.global_state, cfg, server_round)
    return clipped_gradient_sum(model, hidden, data.tensors[2], keys, clip, rate, device)


def masked_input(
    msg: Message,
    context: Context,
    routed: secagg.Routed,
    asked: Asked,
    prepared: Prepared,
    content: RecordDict,
) -> Message:
    """SecAgg+ stage 2: check, record the step's mechanism and spend, send the masked noisy share.

    Raises
    ------
    fedseal.common.refusals.Refusal
        As :func:`check`; nothing is recorded or sent then.
    """
    from fedseal.common.features import features
    from fedseal.common.model import pick_device

    cfg, site = asked.cfg, asked.site
    plan = site_plan(asked, prepared, context, record=True)
    encoding, seed, mechanism = round_mechanism(asked, prepared, content, plan, secagg.cohort_size(context))
    epsilon = _check_budget(asked, prepared, context, plan, mechanism)
    data = cache.encoded(prepared.tokenizer, prepared.examples, cfg.max_length)
    device = pick_device(site.device)
    if is_adapter_round(cfg, asked.round):
        total = adapter_sum(
            cfg, prepared, data, encoding.clip, plan.sample_rate, asked.round, device, feature_cache(site)
        )
    else:
        feats = features(prepared.model, data, device, feature_cache(site))
        total = clipped_sum(
            prepared.model,
            feats,
            data.tensors[2],
            encoding.clip,
            plan.sample_rate,
            ddp_wire.is_statistics_round(cfg, asked.round),
        )
    share = ddp.encode_share(total, encoding, seed)
    steps = steps_done(prepared.ledger, context, asked.job) + 1
    committed = commit_round(
        site.name,
        prepared.ledger,
        context,
        asked.job,
        asked.round,
        steps,
        epsilon,
        plan.delta,
        {"share": share},
        1.0,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=plan.sample_rate,
        mechanism=_mechanism_record(mechanism),
    )
    if prepared.ledger is None:
        _remember(context, mechanism, plan.sample_rate)
    y, complaints = secagg.masked_vector(context, routed, share)
    return egress.build(
        egress.SECAGG_MASKED_INPUT,
        msg,
        {
            egress.MASKED: {Y: y},
            egress.SECAGG: {COMPLAINTS: complaints},
            egress.METRICS: plan_metrics(committed),
            egress.STATUS: status(committed),
        },
    )


__all__ = [
    "HISTORY",
    "SitePlan",
    "check",
    "adapter_sum",
    "clipped_sum",
    "job_epsilon",
    "masked_input",
    "round_mechanism",
    "site_plan",
]
