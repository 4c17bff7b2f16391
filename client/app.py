"""The ClientApp that runs at each data site.

One round, seen from a site:

1. ``train``: first check the run against the site's own policy
   (:mod:`fedseal.client.policy`: DP, secure aggregation, cohort, SecAgg+ k and t,
   update clip; refused before anything else happens), then load the
   server's global trainable weights into the local model, train on the
   site's own file with the settings of :mod:`fedseal.common.dp_rule` (the probe's
   statistics or head round, :mod:`fedseal.client.probe`; or DP-SGD of the encoder,
   :mod:`fedseal.client.trainer`), commit the epsilon this round spends to the site's ledger
   (:mod:`fedseal.client.spend`), and build the reply from that committed round
   (:mod:`fedseal.client.reply`): fresh public keys with secure aggregation (the
   encoded update stays here), or the weighted update ``w * (local - global)``
   and ``w`` on the plain path. A site that cannot or may not train replies
   with a refusal and its reason; the server logs it and goes on.
2. ``train.secagg_*``: the later SecAgg+ stages (:mod:`fedseal.client.secagg`): share
   keys, send the masked update, help unmask. Just before the masked update
   leaves, the site forgets the round's pending update (:mod:`fedseal.client.pending`).
3. ``evaluate``: refused unless the site turned federated evaluation on;
   then accuracy and loss only, once per round this site trained in.

A round the server asks for again (it crashed in between) is answered with the
pending update if it never left the site, and otherwise trained afresh with
new, recorded spend (or refused when the budget cannot cover it): never with
the same update twice.

The configuration of the run arrives with every message from the server; the
site's own settings (data, budget, ledger, policy) come from its node config
(:mod:`fedseal.client.site`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedseal.client import once, secagg
from fedseal.client.budget import grant
from fedseal.client.ledger import Budget, PrivacyLedger
from fedseal.client.pending import PendingUpdate, held, hold, pending_path, release
from fedseal.client.policy import check_evaluate, check_train
from fedseal.client.reply import (answered, evaluate_reply, message_config, message_round,
                                  train_reply)
from fedseal.client.site import SiteSettings, feature_cache, ledger_path, site_settings
from fedseal.client.spend import commit_round, steps_done
from fedseal.common import secagg_wire
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples, read_examples
from fedseal.common.dp_rule import Recipe, recipe, size_bucket
from fedseal.common.records import RecordError, record_to_state, state_digest, to_numpy_state
from fedseal.common.refusals import Code, Refusal
from fedseal.common.vote import is_vote_round, to_votes, update_template
from fedseal.common.weights import site_weight, stats_weight

if TYPE_CHECKING:
    from torch import nn

    from fedseal.common.privacy import DPPlan

# torch, transformers and opacus are imported inside the handlers that train or
# evaluate: the secure-aggregation stages need none of them.

log = logging.getLogger(__name__)

PLAN = "fedseal.plan"  # context.state record: the run's calibrated DP plan
TRAINED = "fedseal.trained-rounds"  # (job, round) pairs trained in this run (context only)
EVALUATED = "fedseal.evaluated-rounds"  # the once-per-round record of evaluated (job, round) pairs
EVALUATED_SUFFIX = ".evaluated.json"  # its file, beside the ledger

app = ClientApp()


def _examples(cfg: FedConfig, site: SiteSettings) -> Examples:
    """The site's examples, read with its own columns, labelled in the run's label order.

    The run's labels were checked against the site's declared set
    (:func:`fedseal.client.policy.check_run`); the server's column settings are
    never used on the site's file.
    """
    return read_examples(site.data_path, text_column=site.text_column,
                         label_column=site.label_column, label_names=cfg.labels)


def _global_model(msg: Message, cfg: FedConfig) -> tuple["nn.Module", object, dict[str, np.ndarray]]:
    """The local model holding the server's global weights, its tokenizer, and those weights."""
    from fedseal.common.model import build_model, load_tokenizer, load_trainable, trainable_state

    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, cfg.labels)
    template = to_numpy_state(trainable_state(model))
    try:
        global_state = record_to_state(msg.content["global"], template, what="global weights")
    except (RecordError, KeyError, TypeError) as exc:
        raise Refusal(Code.MESSAGE_WEIGHTS, f"the server's weights do not fit this site's "
                      f"{cfg.model!r} ({exc})") from None
    load_trainable(model, global_state)
    return model, tokenizer, global_state


def _deployment_logging(context: Context) -> None:
    """At a real site, show this app's log lines in the agent's output."""
    if "data-path" in context.node_config:
        from fedseal.common.cli_args import setup_logging

        setup_logging()


def _open_ledger(site: SiteSettings) -> PrivacyLedger | None:
    if site.ledger_path is None:
        return None
    return PrivacyLedger.open(site.ledger_path, site.name, site.epsilon, site.delta,
                              key_path=site.ledger_key)


def _evaluation_planned(cfg: FedConfig, site: SiteSettings) -> bool:
    """Whether this job's budget also covers one evaluation step per round."""
    return cfg.federated_eval and site.policy.federated_eval == "on"


def _planned_steps(cfg: FedConfig, rec: Recipe, site: SiteSettings) -> int:
    """Steps the job's noise is calibrated for: training, and evaluation where both sides allow it."""
    return rec.steps_through(cfg.rounds) + (cfg.rounds if _evaluation_planned(cfg, site) else 0)


def _calibrated(context: Context, cfg: FedConfig, rec: Recipe, steps: int, bucket: int,
                budget: float, delta: float) -> "DPPlan":
    """``plan_site``, remembered in the run's Context.state.

    Each message runs in a fresh process in a deployment, so the in-process
    cache of :func:`plan_site` is empty every round; calibrating again (seconds
    with the PRV accountant) would give the same numbers.
    """
    from fedseal.common.privacy import DPPlan, PrivacyError, plan_site

    key = repr((bucket, rec.batch_size, steps, budget, delta, cfg.accountant))
    if PLAN in context.state and context.state[PLAN].get("key") == key:
        saved = context.state[PLAN]
        return DPPlan(float(saved["noise-multiplier"]), float(saved["sample-rate"]), steps,
                      budget, delta, cfg.accountant)
    try:
        plan = plan_site(bucket, batch_size=rec.batch_size, steps=steps, epsilon=budget,
                         delta=delta, accountant=cfg.accountant)
    except PrivacyError as exc:  # e.g. delta not below 1/n, or the batch covers all data
        raise Refusal(Code.PLAN_INFEASIBLE, str(exc), setting="epsilon", asked=cfg.epsilon) from None
    context.state[PLAN] = ConfigRecord({"key": key, "noise-multiplier": plan.noise_multiplier,
                                        "sample-rate": plan.sample_rate})
    return plan


def _plan(context: Context, cfg: FedConfig, rec: Recipe, site: SiteSettings, bucket: int,
          ledger: PrivacyLedger | None, job: str, after_steps: int) -> "DPPlan":
    """This job's DP plan, calibrated to its grant (:func:`fedseal.client.budget.grant`) and
    checked to cover ``after_steps`` steps; the plan's ``delta`` is the grant's."""
    from fedseal.common.privacy import epsilon_spent

    planned = _planned_steps(cfg, rec, site)

    def calibrate(epsilon: float, delta: float) -> "DPPlan":
        return _calibrated(context, cfg, rec, planned, bucket, epsilon, delta)

    granted = grant(ledger, job, cfg.epsilon, cfg.delta, site.policy,
                    Budget(site.epsilon, site.delta), check=calibrate)
    plan = calibrate(granted.epsilon, granted.delta)
    recorded = ledger.plan_of(job) if ledger else None
    if recorded and not np.allclose(recorded, (plan.noise_multiplier, plan.sample_rate),
                                    rtol=1e-9, atol=0):
        raise Refusal(Code.PLAN_CHANGED,
                      f"this run started with noise multiplier {recorded[0]:.4f} and sample "
                      f"rate {recorded[1]:.5f}, now {plan.noise_multiplier:.4f} and "
                      f"{plan.sample_rate:.5f} (rounds, local steps, batch size or the data "
                      "changed): the calibration cannot change mid-run; start a new run")
    after = epsilon_spent(plan.noise_multiplier, plan.sample_rate, after_steps, granted.delta,
                          plan.accountant)
    if after > granted.epsilon:
        raise Refusal(Code.BUDGET_ROUND, f"this step would bring job {job}'s epsilon to "
                      f"{after:.3f}, over its grant of {granted.epsilon:g} at this site")
    return plan


@app.train()
@answered()
def train(msg: Message, context: Context) -> Message:
    """Train locally with DP-SGD and reply from the committed round (or refuse with a code)."""
    _deployment_logging(context)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    from fedseal.client.probe import probe_round
    from fedseal.client.trainer import train_local
    from fedseal.common.batches import encode
    from fedseal.common.model import pick_device, trainable_state
    from fedseal.common.privacy import epsilon_spent

    started = time.monotonic()
    cfg = message_config(msg)
    site = site_settings(context.node_config, cfg)
    check_train(site.policy, cfg, msg.content.config_records.get("secagg"))
    job, server_round = message_round(msg, context)
    if cfg.secagg:  # before any training: a round this site cannot join costs no budget
        secagg.check_round(msg, context, site, server_round)
    examples = _examples(cfg, site)
    bucket = size_bucket(len(examples))
    ledger = _open_ledger(site) if cfg.dp else None
    model, tokenizer, global_state = _global_model(msg, cfg)
    digest = state_digest(global_state)
    template = update_template(global_state, cfg, server_round)
    weight = site_weight(bucket, cfg)
    pending_file = pending_path(ledger.path) if ledger is not None and cfg.secagg else None
    pending = held(pending_file, job, server_round, digest) if pending_file else None
    if pending is not None and set(pending.update) != set(template):
        pending = None  # not an update of this model: train afresh
    if pending is not None:
        # The server asks again for a round whose update never left this site:
        # answer with it under fresh keys and masks (no new spend).
        log.info("site %s: round %d of job %s was trained before and never sent; answering "
                 "with that update", site.name, server_round, job)
        update, loss = {k: pending.update[k] for k in template}, float("nan")
        committed = commit_round(site.name, ledger, context, job, server_round, pending.steps,
                                 pending.epsilon, site.delta, update, pending.weight,
                                 noise_multiplier=pending.noise_multiplier,
                                 sample_rate=pending.sample_rate)
    else:
        done = steps_done(ledger, context, job)
        rec = recipe(cfg, bucket)
        try:
            plan = (_plan(context, cfg, rec, site, bucket, ledger, job,
                          done + rec.steps_in_round(server_round)) if cfg.dp else None)
        except Refusal as exc:
            if ledger is not None and ledger.has_round(job, server_round):
                raise Refusal(Code.ROUND_SENT, f"round {server_round} of job {job} was trained "
                              "before and its update has left this site, so it is never sent "
                              f"again; training it afresh is refused: {exc.detail}",
                              round=server_round) from None
            raise
        device = pick_device(site.device)
        data = encode(tokenizer, examples, cfg.max_length)
        if rec.mode == "probe":
            result = probe_round(model, data, rec, plan, server_round, device,
                                 feature_cache(site))
        else:
            result = train_local(model, data, cfg, rec, plan, device)
        steps, loss = done + result.steps, result.mean_loss
        if result.count is not None:  # the statistics round: weighted by its (DP) count
            weight = stats_weight(result.count, cfg)
        local_state = to_numpy_state(trainable_state(model))
        update = {k: local_state[k] - global_state[k] for k in template if k in global_state}
        if not all(np.isfinite(v).all() for v in update.values()):
            raise Refusal(Code.TRAIN_DIVERGED, "local training diverged (NaN/inf in the "
                          "update); lower --lr or --max-grad-norm")
        if is_vote_round(cfg, server_round):
            update = to_votes(update)
        update = {k: weight * v for k, v in update.items()}
        job_epsilon = (epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, plan.delta,
                                     plan.accountant) if plan else None)
        noise, rate = (plan.noise_multiplier, plan.sample_rate) if plan else (0.0, 0.0)
        if pending_file is not None:
            hold(pending_file, PendingUpdate(job, server_round, digest, update, weight, steps,
                                             job_epsilon, noise, rate))
        committed = commit_round(site.name, ledger, context, job, server_round, steps,
                                 job_epsilon, plan.delta if plan else site.delta, update, weight,
                                 noise_multiplier=noise, sample_rate=rate)
    once.remember(context, TRAINED, None, once.done(context, TRAINED, None) | {(job, server_round)})
    # The training loss stays here: it is computed from the records without noise.
    log.info("site %s: round %d, %d steps in this run, loss %.4f, epsilon %s / %s (delta %s "
             "over all jobs), %.1fs", site.name, server_round, committed.steps, loss,
             f"{committed.epsilon:.3f}" if committed.private else "inf (no DP)", site.epsilon,
             f"{committed.delta:.3g}" if committed.private else "-", time.monotonic() - started)
    return train_reply(msg, context, cfg, site, committed, update)


app.train(secagg_wire.SHARE_KEYS)(answered(stage=True)(secagg.share_keys))
app.train(secagg_wire.CONSISTENCY)(answered(stage=True)(secagg.consistency))


@app.train(secagg_wire.MASKED_INPUT)
@answered(stage=True)
def masked_input(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2: forget the pending update durably, then send it masked."""
    ledger = ledger_path(context.node_config)
    if ledger is not None:
        release(pending_path(ledger))
    return secagg.masked_input(msg, context)


app.train(secagg_wire.UNMASK)(answered(stage=True)(secagg.unmask))


@app.evaluate()
@answered()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Score the server's weights on the site's data, if the site allows federated evaluation.

    Refused unless the site's policy has ``federated-eval = on``; then at most
    once per round of a job this site trained in. The answer is a DP release
    (:mod:`fedseal.client.evaluation`), its step committed to the budget first.
    """
    _deployment_logging(context)
    from fedseal.client.evaluation import example_scores, release_scores
    from fedseal.common.batches import encode
    from fedseal.common.features import features
    from fedseal.common.model import pick_device
    from fedseal.common.privacy import epsilon_spent

    cfg = message_config(msg)
    site = site_settings(context.node_config, cfg)
    check_evaluate(site.policy, cfg)
    job, server_round = message_round(msg, context)
    if (job, server_round) not in once.done(context, TRAINED, None):
        raise Refusal(Code.ROUND_NOT_TRAINED, f"this site did not train round {server_round} of "
                      f"job {job}; it scores only rounds it took part in", round=server_round)
    path = once.record_path(site.ledger_path, EVALUATED_SUFFIX) if site.ledger_path else None
    evaluated = once.done(context, EVALUATED, path)
    if (job, server_round) in evaluated:
        raise Refusal(Code.ROUND_EVALUATED, f"round {server_round} of job {job} was already "
                      "evaluated here; a site answers once per round", round=server_round)
    examples = _examples(cfg, site)
    bucket = size_bucket(len(examples))
    ledger = _open_ledger(site) if cfg.dp else None
    steps = steps_done(ledger, context, job) + 1
    rec = recipe(cfg, bucket)
    plan = _plan(context, cfg, rec, site, bucket, ledger, job, steps) if cfg.dp else None
    once.remember(context, EVALUATED, path, evaluated | {(job, server_round)})
    model, tokenizer, _ = _global_model(msg, cfg)
    device = pick_device(site.device)
    model.to(device)
    data = encode(tokenizer, examples, cfg.max_length)
    feats = (features(model, data, device, feature_cache(site)) if cfg.finetune == "probe"
             else None)
    scores = release_scores(*example_scores(model, data, cfg.eval_batch_size, device, feats),
                            plan)
    job_epsilon = (epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, plan.delta,
                                 plan.accountant) if plan else None)
    noise, rate = (plan.noise_multiplier, plan.sample_rate) if plan else (0.0, 0.0)
    committed = commit_round(site.name, ledger, context, job, server_round, steps, job_epsilon,
                             plan.delta if plan else site.delta, {}, 0.0,
                             noise_multiplier=noise, sample_rate=rate)
    return evaluate_reply(msg, site, committed, scores)
