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

from fedseal.client import cache, once, secagg
from fedseal.client.ledger import LedgerError, PrivacyLedger
from fedseal.client.pending import PendingUpdate, held, hold, pending_path, release
from fedseal.client.policy import check_evaluate, check_train
from fedseal.client.reply import Refusal, evaluate_reply, message_round, refusal, train_reply
from fedseal.client.site import SiteSettings, feature_cache, ledger_path, site_name, site_settings
from fedseal.client.spend import commit_round, other_jobs_epsilon, steps_done
from fedseal.common import secagg_wire
from fedseal.common.config import ConfigError, FedConfig
from fedseal.common.data import DataError, Examples, read_examples
from fedseal.common.records import (RecordError, record_to_config, record_to_state, state_digest,
                                    to_numpy_state)
from fedseal.common.vote import is_vote_round, to_votes, update_template
from fedseal.common.weights import site_weight, stats_weight

if TYPE_CHECKING:
    from fedseal.common.dp_rule import Recipe
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
    try:
        return read_examples(site.data_path, text_column=cfg.text_column,
                             label_column=cfg.label_column, label_names=cfg.labels)
    except DataError as exc:
        raise Refusal(f"the site's data does not fit this run ({exc}); the server's labels are "
                      f"{list(cfg.labels)}, its columns {cfg.text_column!r}/{cfg.label_column!r}") from None


def _global_model(msg: Message, cfg: FedConfig) -> tuple["nn.Module", object, dict[str, np.ndarray]]:
    """The local model holding the server's global weights, its tokenizer, and those weights."""
    from fedseal.common.model import load_trainable, trainable_state

    model, tokenizer = cache.model_and_tokenizer(cfg)  # a working copy, built once per process
    template = to_numpy_state(trainable_state(model))
    try:
        global_state = record_to_state(msg.content["global"], template, what="global weights")
    except RecordError as exc:
        raise Refusal(f"the server's model does not match this site's {cfg.model!r} ({exc}); "
                      "install the same model at the site") from None
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally with DP-SGD and reply from the committed round (or refuse, saying why)."""
    _deployment_logging(context)
    try:
        return _train(msg, context)
    except (Refusal, LedgerError, DataError, ConfigError) as exc:
        return refusal(msg, site_name(context.node_config, context.node_id), str(exc))


def _calibrated(context: Context, cfg: FedConfig, rec: "Recipe", n: int, budget: float,
                delta: float) -> "DPPlan":
    """``plan_site``, remembered in the run's Context.state.

    Each message runs in a fresh process in a deployment, so the in-process
    cache of :func:`plan_site` is empty every round; calibrating again (seconds
    with the PRV accountant) would give the same numbers.
    """
    from fedseal.common.privacy import DPPlan, plan_site

    steps = rec.steps_through(cfg.rounds)
    key = repr((n, rec.batch_size, steps, budget, delta, cfg.accountant))
    if PLAN in context.state and context.state[PLAN].get("key") == key:
        saved = context.state[PLAN]
        return DPPlan(float(saved["noise-multiplier"]), float(saved["sample-rate"]), steps,
                      budget, delta, cfg.accountant)
    plan = plan_site(n, batch_size=rec.batch_size, steps=steps, epsilon=budget, delta=delta,
                     accountant=cfg.accountant)
    context.state[PLAN] = ConfigRecord({"key": key, "noise-multiplier": plan.noise_multiplier,
                                        "sample-rate": plan.sample_rate})
    return plan


def _plan(context: Context, cfg: FedConfig, rec: "Recipe", site: SiteSettings, n: int,
          ledger: PrivacyLedger | None, job: str, done: int, server_round: int) -> "DPPlan":
    """This job's DP plan, checked to cover this round within the site's budget."""
    from fedseal.common.privacy import PrivacyError, epsilon_spent

    other = other_jobs_epsilon(ledger, job)
    budget = site.epsilon - other
    if budget <= 0:
        raise Refusal(f"earlier runs spent epsilon {other:.3f} of the site's budget "
                      f"{site.epsilon}; nothing is left for this run")
    try:
        plan = _calibrated(context, cfg, rec, n, budget, site.delta)
    except PrivacyError as exc:  # e.g. delta not below 1/n, or the batch covers all data
        raise Refusal(str(exc)) from None
    recorded = ledger.plan_of(job) if ledger else None
    if recorded and not np.allclose(recorded, (plan.noise_multiplier, plan.sample_rate),
                                    rtol=1e-9, atol=0):
        raise Refusal(f"this run started with noise multiplier {recorded[0]:.4f} and sample "
                      f"rate {recorded[1]:.5f}, now {plan.noise_multiplier:.4f} and "
                      f"{plan.sample_rate:.5f} (rounds, local steps, batch size or the data "
                      "changed): the calibration cannot change mid-run; start a new run")
    after = epsilon_spent(plan.noise_multiplier, plan.sample_rate,
                          done + rec.steps_in_round(server_round), site.delta, plan.accountant)
    if other + after > site.epsilon * (1 + 1e-9):
        raise Refusal(f"this round would bring epsilon to {other + after:.3f}, over the site's "
                      f"budget of {site.epsilon}")
    return plan


def _train(msg: Message, context: Context) -> Message:
    from fedseal.client.probe import probe_round
    from fedseal.client.trainer import train_local
    from fedseal.common.dp_rule import recipe
    from fedseal.common.model import pick_device, trainable_state
    from fedseal.common.privacy import epsilon_spent

    started = time.monotonic()
    cfg = record_to_config(msg.content["config"])
    site = site_settings(context.node_config, cfg)
    check_train(site.policy, cfg, msg.content.config_records.get("secagg"))
    job, server_round = message_round(msg, context)
    if cfg.secagg:  # before any training: a round this site cannot join costs no budget
        secagg.check_round(msg, context, site, server_round)
    examples = _examples(cfg, site)
    ledger = _open_ledger(site) if cfg.dp else None
    model, tokenizer, global_state = _global_model(msg, cfg)
    digest = state_digest(global_state)
    template = update_template(global_state, cfg, server_round)
    weight = site_weight(len(examples), cfg)
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
        rec = recipe(cfg, len(examples))
        try:
            plan = (_plan(context, cfg, rec, site, len(examples), ledger, job, done, server_round)
                    if cfg.dp else None)
        except Refusal as exc:
            if ledger is not None and ledger.has_round(job, server_round):
                raise Refusal(f"round {server_round} of job {job} was trained before and its "
                              "update has left this site, so it is never sent again; training "
                              f"it afresh is refused: {exc}") from None
            raise
        device = pick_device(site.device)
        data = cache.encoded(tokenizer, examples, cfg.max_length)
        if rec.mode == "probe":
            result = probe_round(model, data, rec, plan, server_round, device,
                                 feature_cache(site))
        else:
            result = train_local(model, data, cfg, rec, plan, device)
        steps, loss = done + result.steps, result.mean_loss
        if result.count is not None:  # the statistics round: weighted by its (DP) count
            weight = stats_weight(result.count, cfg)
        local_state = to_numpy_state(trainable_state(model))
        update = {k: local_state[k] - global_state[k] for k in global_state}
        if is_vote_round(cfg, server_round):
            update = to_votes(update)
        update = {k: weight * v for k, v in update.items()}
        job_epsilon = (epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, site.delta,
                                     plan.accountant) if plan else None)
        noise, rate = (plan.noise_multiplier, plan.sample_rate) if plan else (0.0, 0.0)
        if pending_file is not None:
            hold(pending_file, PendingUpdate(job, server_round, digest, update, weight, steps,
                                             job_epsilon, noise, rate))
        committed = commit_round(site.name, ledger, context, job, server_round, steps,
                                 job_epsilon, site.delta, update, weight,
                                 noise_multiplier=noise, sample_rate=rate)
    if not all(np.isfinite(v).all() for v in update.values()):
        raise Refusal("local training diverged (NaN/inf in the update); lower --lr or "
                      "--max-grad-norm")
    once.remember(context, TRAINED, None, once.done(context, TRAINED, None) | {(job, server_round)})
    log.info("site %s: round %d, %d steps in this run, loss %.4f, epsilon %s / %s (delta %s "
             "over all jobs), %.1fs", site.name, server_round, committed.steps, loss,
             f"{committed.epsilon:.3f}" if committed.private else "inf (no DP)", site.epsilon,
             f"{committed.delta:.3g}" if committed.private else "-", time.monotonic() - started)
    return train_reply(msg, context, cfg, site, committed, update, loss)


app.train(secagg_wire.SHARE_KEYS)(secagg.share_keys)
app.train(secagg_wire.CONSISTENCY)(secagg.consistency)


@app.train(secagg_wire.MASKED_INPUT)
def masked_input(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2: forget the pending update durably, then send it masked."""
    ledger = ledger_path(context.node_config)
    if ledger is not None:
        release(pending_path(ledger))
    return secagg.masked_input(msg, context)


app.train(secagg_wire.UNMASK)(secagg.unmask)


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Score the server's weights on the site's data, if the site allows federated evaluation.

    Refused unless the site's policy has ``federated-eval = on``; then at most
    once per round of a job this site trained in, and only accuracy and loss
    return (not differentially private: see the README's threat model).
    """
    _deployment_logging(context)
    try:
        from fedseal.common.batches import evaluate
        from fedseal.common.model import pick_device

        cfg = record_to_config(msg.content["config"])
        site = site_settings(context.node_config, cfg)
        check_evaluate(site.policy)
        job, server_round = message_round(msg, context)
        if (job, server_round) not in once.done(context, TRAINED, None):
            raise Refusal(f"this site did not train round {server_round} of job {job}; it scores "
                          "only rounds it took part in")
        path = once.record_path(site.ledger_path, EVALUATED_SUFFIX) if site.ledger_path else None
        evaluated = once.done(context, EVALUATED, path)
        if (job, server_round) in evaluated:
            raise Refusal(f"round {server_round} of job {job} was already evaluated here; a site "
                          "answers once per round")
        once.remember(context, EVALUATED, path, evaluated | {(job, server_round)})
        examples = _examples(cfg, site)
        model, tokenizer, _ = _global_model(msg, cfg)
        device = pick_device(site.device)
        model.to(device)
        scores = evaluate(model, cache.encoded(tokenizer, examples, cfg.max_length),
                          batch_size=cfg.eval_batch_size, num_labels=len(cfg.labels), device=device)
        return evaluate_reply(msg, site.name, scores)
    except (Refusal, DataError, ConfigError, once.OnceError) as exc:
        return refusal(msg, site_name(context.node_config, context.node_id), str(exc))
