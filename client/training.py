"""One round of local training at a site, step by step, from the server's message to a committed update.

:func:`admit` checks a ``train`` message (the run's config, the site's policy, the
round, the secure-aggregation parameters) before anything is read;
:func:`prepare` reads the site's data and builds the model holding the
server's weights, and checks that the job's budget covers the round (without
writing anything); :func:`train_round` trains, commits the round's spend to the
ledger (:mod:`fedseal.client.spend`) and returns the committed round with the
update it may send. A secure round prepares when the server asks for keys and
trains only when it asks for the masked input, after the cohort has shown it
can complete the round, so a round abandoned for too few sites costs no site
any budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, RecordDict

from fedseal.client import cache, once, secagg
from fedseal.client.ledger import PrivacyLedger
from fedseal.client.pending import PendingUpdate, held, hold, pending_path
from fedseal.client.plan import job_plan
from fedseal.client.policy import check_hold, check_train
from fedseal.client.reply import message_config, message_round
from fedseal.client.site import SiteSettings, feature_cache, reply_hold, site_settings
from fedseal.client.spend import CommittedRound, commit_round, steps_done
from fedseal.common.buckets import size_bucket
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples, read_examples
from fedseal.common.dp_rule import Recipe, recipe
from fedseal.common.records import RecordError, record_to_state, state_digest, to_numpy_state
from fedseal.common.refusals import Code, Refusal
from fedseal.common.vote import is_vote_round, to_votes, update_template
from fedseal.common.weights import site_weight, stats_weight

if TYPE_CHECKING:
    from torch import nn

    from fedseal.common.privacy import DPPlan

log = logging.getLogger(__name__)

TRAINED = "fedseal.trained-rounds"  # (job, round) pairs trained in this run (context only)


@dataclass(frozen=True)
class Asked:
    """A ``train`` message, checked: the run's config, the site, the job and the round."""

    cfg: FedConfig
    site: SiteSettings
    job: str
    round: int


@dataclass
class Prepared:
    """What a round needs before it trains, all of it checked."""

    examples: Examples
    bucket: int
    recipe: Recipe
    ledger: PrivacyLedger | None
    model: nn.Module
    tokenizer: Any
    global_state: dict[str, np.ndarray]
    template: dict[str, np.ndarray]


def admit(content: RecordDict, context: Context) -> Asked:
    """Check a ``train`` message's content against the site's policy before anything is read.

    Raises
    ------
    fedseal.common.refusals.Refusal
        Naming the first thing the site will not do.
    """
    cfg = message_config(content)
    site = site_settings(context.node_config, cfg)
    check_hold(reply_hold(context.node_config), cfg)
    check_train(site.policy, cfg, content.config_records.get("secagg"))
    job, server_round = message_round(content, context)
    if cfg.secagg:  # before anything is read: a round this site cannot join costs nothing
        ctx = secagg.check_round(content, context, site, server_round)
        if cfg.dp_noise != "distributed":  # a distributed round's encoding: ddp_round.check
            secagg.check_encoding(cfg, ctx)
    return Asked(cfg, site, job, server_round)


def examples_of(cfg: FedConfig, site: SiteSettings) -> Examples:
    """The site's examples, read with its own columns, labelled in the run's label order.

    The run's labels were checked against the site's declared set
    (:func:`fedseal.client.policy.check_run`); the server's column settings are
    never used on the site's file.
    """
    return read_examples(
        site.data_path, text_column=site.text_column, label_column=site.label_column, label_names=cfg.labels
    )


def global_model(content: RecordDict, cfg: FedConfig) -> tuple[nn.Module, Any, dict[str, np.ndarray]]:
    """The local model holding the server's global weights, its tokenizer, and those weights."""
    from fedseal.common.model import load_trainable, trainable_state

    model, tokenizer = cache.model_and_tokenizer(cfg)  # a working copy, built once per process
    template = to_numpy_state(trainable_state(model))
    try:
        global_state = record_to_state(content["global"], template, what="global weights")
    except (RecordError, KeyError, TypeError) as exc:
        raise Refusal(
            Code.MESSAGE_WEIGHTS, f"the server's weights do not fit this site's {cfg.model!r} ({exc})"
        ) from None
    load_trainable(model, global_state)
    return model, tokenizer, global_state


def open_ledger(site: SiteSettings) -> PrivacyLedger | None:
    """The site's ledger, if it keeps one."""
    if site.ledger_path is None:
        return None
    return PrivacyLedger.open(site.ledger_path, site.name, site.epsilon, site.delta, key_path=site.ledger_key)


def prepare(asked: Asked, content: RecordDict, context: Context) -> Prepared:
    """Read the data, build the model, and check that the job's budget covers this round.

    Nothing is written: a new job's grant is only computed (:func:`fedseal.client.plan.job_plan`).
    """
    cfg, site = asked.cfg, asked.site
    examples = examples_of(cfg, site)
    bucket = size_bucket(len(examples))
    ledger = open_ledger(site) if cfg.dp else None
    model, tokenizer, global_state = global_model(content, cfg)
    rec = recipe(cfg, bucket)
    prepared = Prepared(
        examples,
        bucket,
        rec,
        ledger,
        model,
        tokenizer,
        global_state,
        update_template(global_state, cfg, asked.round),
    )
    if cfg.dp and cfg.dp_noise == "local" and _held(asked, prepared) is None:
        _plan(asked, prepared, context, record=False)
    return prepared


def _plan(asked: Asked, prepared: Prepared, context: Context, *, record: bool) -> DPPlan:
    """The job's plan for this round; a refusal says so if the round was sent before."""
    try:
        return job_plan(
            context,
            asked.cfg,
            prepared.recipe,
            asked.site,
            prepared.bucket,
            prepared.ledger,
            asked.job,
            asked.round,
            record=record,
        )
    except Refusal as exc:
        if prepared.ledger is not None and prepared.ledger.has_round(asked.job, asked.round):
            raise Refusal(
                Code.ROUND_SENT,
                f"round {asked.round} of job {asked.job} was trained "
                "before and its update has left this site, so it is never sent "
                f"again; training it afresh is refused: {exc.detail}",
                round=asked.round,
            ) from None
        raise


def _pending_file(asked: Asked, prepared: Prepared):
    ledger = prepared.ledger
    return pending_path(ledger.path) if ledger is not None and asked.cfg.secagg else None


def _held(asked: Asked, prepared: Prepared) -> PendingUpdate | None:
    """The update of this very round that was trained and never left, if the site keeps one."""
    path = _pending_file(asked, prepared)
    if path is None:
        return None
    pending = held(path, asked.job, asked.round, state_digest(prepared.global_state))
    if pending is not None and set(pending.update) != set(prepared.template):
        return None  # not an update of this model: train afresh
    return pending


def train_round(
    asked: Asked, prepared: Prepared, context: Context
) -> tuple[CommittedRound, dict[str, np.ndarray]]:
    """Train (or reuse this round's update that never left), commit the spend, return both.

    The update is what the reply may send: the weighted change of the round's
    weights (:func:`fedseal.common.vote.update_template`), as votes in a vote round.
    """
    started = time.monotonic()
    site = asked.site
    pending = _held(asked, prepared)
    if pending is not None:
        # The server asks again for a round whose update never left this site:
        # answer with it under fresh keys and masks (no new spend).
        log.info(
            "site %s: round %d of job %s was trained before and never sent; answering with that update",
            site.name,
            asked.round,
            asked.job,
        )
        update = {k: pending.update[k] for k in prepared.template}
        committed = commit_round(
            site.name,
            prepared.ledger,
            context,
            asked.job,
            asked.round,
            pending.steps,
            pending.epsilon,
            site.delta,
            update,
            pending.weight,
            noise_multiplier=pending.noise_multiplier,
            sample_rate=pending.sample_rate,
        )
    else:
        committed, update = _train_afresh(asked, prepared, context)
    once.remember(context, TRAINED, None, once.done(context, TRAINED, None) | {(asked.job, asked.round)})
    log.info(
        "site %s: round %d, %d steps in this run, epsilon %s / %s (delta %s over all jobs), %.1fs",
        site.name,
        asked.round,
        committed.steps,
        f"{committed.epsilon:.3f}" if committed.private else "inf (no DP)",
        site.epsilon,
        f"{committed.delta:.3g}" if committed.private else "-",
        time.monotonic() - started,
    )
    return committed, update


def _train_afresh(
    asked: Asked, prepared: Prepared, context: Context
) -> tuple[CommittedRound, dict[str, np.ndarray]]:
    from fedseal.client.history import epsilon_after
    from fedseal.client.lpft import lpft_round
    from fedseal.client.probe import probe_round
    from fedseal.client.trainer import train_local
    from fedseal.common.lora_rule import round_phase
    from fedseal.common.model import pick_device, trainable_state

    cfg, site, rec = asked.cfg, asked.site, prepared.recipe
    done = steps_done(prepared.ledger, context, asked.job)
    plan = _plan(asked, prepared, context, record=True) if cfg.dp else None
    device = pick_device(site.device)
    data = cache.encoded(prepared.tokenizer, prepared.examples, cfg.max_length)
    if rec.mode == "probe":
        result = probe_round(prepared.model, data, rec, plan, asked.round, device, feature_cache(site))
    elif rec.mode == "lora":
        result = lpft_round(
            prepared.model, data, rec, plan, asked.round, prepared.bucket, device, feature_cache(site)
        )
    else:
        result = train_local(prepared.model, data, cfg, rec, plan, device)
    # The training loss stays here: it is computed from the records without noise.
    log.info("site %s: round %d trained, loss %.4f", site.name, asked.round, result.mean_loss)
    steps = done + result.steps
    weight = (
        stats_weight(result.count, cfg)
        if result.count is not None  # the statistics round
        else site_weight(prepared.bucket, cfg)
    )
    local_state = to_numpy_state(trainable_state(prepared.model))
    update = {
        k: local_state[k] - prepared.global_state[k] for k in prepared.template if k in prepared.global_state
    }
    if not all(np.isfinite(v).all() for v in update.values()):
        raise Refusal(
            Code.TRAIN_DIVERGED,
            "local training diverged (NaN/inf in the update); lower --lr or --max-grad-norm",
        )
    if is_vote_round(cfg, asked.round):
        update = to_votes(update)
    update = {k: weight * v for k, v in update.items()}
    phase = round_phase(plan, rec, asked.round, result.steps) if plan else None
    job_epsilon = epsilon_after(prepared.ledger, context, asked.job, plan, phase) if plan else None
    noise, rate = (phase.noise_multiplier, phase.sample_rate) if phase else (0.0, 0.0)
    pending_file = _pending_file(asked, prepared)
    if pending_file is not None:
        hold(
            pending_file,
            PendingUpdate(
                asked.job,
                asked.round,
                state_digest(prepared.global_state),
                update,
                weight,
                steps,
                job_epsilon,
                noise,
                rate,
            ),
        )
    committed = commit_round(
        site.name,
        prepared.ledger,
        context,
        asked.job,
        asked.round,
        steps,
        job_epsilon,
        plan.delta if plan else site.delta,
        update,
        weight,
        noise_multiplier=noise,
        sample_rate=rate,
    )
    return committed, update


__all__ = [
    "Asked",
    "Prepared",
    "TRAINED",
    "admit",
    "examples_of",
    "global_model",
    "open_ledger",
    "prepare",
    "train_round",
]
