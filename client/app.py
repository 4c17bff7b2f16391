"""The ClientApp that runs at each data site.

One round, seen from a site:

1. ``train``: load the server's global trainable weights into the local model,
   run DP-SGD on the site's own file, record the epsilon this round spends in
   the site's ledger (:mod:`client.ledger`) *before* anything leaves the site,
   and reply with the weighted update ``w * (local - global)`` and ``w`` (plain
   path), or, with secure aggregation, keep the encoded update and reply with
   fresh public keys. A site that cannot or may not train (budget exhausted,
   ledger tampered with, data or model not matching the run) replies with a
   refusal and its reason instead; the server logs it and goes on.
2. ``train.secagg_*``: the later SecAgg+ stages (:mod:`client.secagg`): share
   keys, send the masked update, help unmask.
3. ``evaluate`` (optional): accuracy and loss of the global weights on the site's data.

A round the server asks for again (it crashed before completing it) is
answered with the update already computed (:mod:`client.resend`), so it is
counted once in the ledger.

The configuration of the run arrives with every message from the server; the
site's own settings (data, budget, ledger) come from its node config
(:mod:`client.site`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.ledger import LedgerError, PrivacyLedger
from client.resend import SavedUpdate, load_update, resend_path, save_update
from client.site import SiteSettings, site_settings
from common import secagg_wire
from common.config import ConfigError, FedConfig
from common.data import DataError, Examples, read_examples
from common.records import (JOB_KEY, ROUND_KEY, RecordError, flatten, record_to_config,
                            record_to_state, state_digest, state_to_record, to_numpy_state)
from common.weights import site_weight

if TYPE_CHECKING:
    from torch import nn

    from common.privacy import DPPlan

# torch, transformers and opacus are imported inside the handlers that train or
# evaluate: each message starts a fresh ClientApp process in a deployment, and
# the secure-aggregation stages need none of them.

log = logging.getLogger(__name__)

PROGRESS = "fedseal.progress"  # context.state record: DP steps taken so far
PLAN = "fedseal.plan"  # context.state record: the run's calibrated DP plan

app = ClientApp()


class Refusal(Exception):
    """The site declines this round; the reason goes back to the server."""


def _load(msg: Message, context: Context) -> tuple[FedConfig, SiteSettings, Examples]:
    cfg = record_to_config(msg.content["config"])
    site = site_settings(context.node_config, cfg)
    try:
        examples = read_examples(site.data_path, text_column=cfg.text_column,
                                 label_column=cfg.label_column, label_names=cfg.labels)
    except DataError as exc:
        raise Refusal(f"the site's data does not fit this run ({exc}); the server's labels are "
                      f"{list(cfg.labels)}, its columns {cfg.text_column!r}/{cfg.label_column!r}") from None
    return cfg, site, examples


def _global_model(msg: Message, cfg: FedConfig) -> tuple["nn.Module", object, dict[str, np.ndarray]]:
    """The local model holding the server's global weights, its tokenizer, and those weights."""
    from common.model import build_model, load_tokenizer, load_trainable, trainable_state

    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, cfg.labels)
    template = to_numpy_state(trainable_state(model))
    try:
        global_state = record_to_state(msg.content["global"], template, what="global weights")
    except RecordError as exc:
        raise Refusal(f"the server's model does not match this site's {cfg.model!r} ({exc}); "
                      "install the same model at the site") from None
    load_trainable(model, global_state)
    return model, tokenizer, global_state


def _steps_done(context: Context) -> int:
    if PROGRESS in context.state:
        return int(context.state[PROGRESS]["steps"])
    return 0


def _refuse(msg: Message, site_name: str, reason: str) -> Message:
    log.warning("site %s refuses to train: %s", site_name, reason)
    return Message(RecordDict({"status": ConfigRecord({"site": site_name, "refused": reason})}),
                   reply_to=msg)


def _deployment_logging(context: Context) -> None:
    """At a real site, show this app's log lines in the SuperNode's output."""
    if "data-path" in context.node_config:
        from common.cli_args import setup_logging

        setup_logging()


def _site_name(context: Context) -> str:
    return str(context.node_config.get("site-name", context.node_id))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally with DP-SGD and reply with the weighted update (or refuse, saying why)."""
    _deployment_logging(context)
    try:
        return _train(msg, context)
    except (Refusal, LedgerError, DataError, ConfigError) as exc:
        return _refuse(msg, _site_name(context), str(exc))


def _calibrated(context: Context, cfg: FedConfig, n: int, budget: float, delta: float) -> "DPPlan":
    """``plan_site``, remembered in the run's Context.state.

    Each message runs in a fresh process in a deployment, so the in-process
    cache of :func:`plan_site` is empty every round; calibrating again (seconds
    with the PRV accountant) would give the same numbers.
    """
    from common.privacy import DPPlan, plan_site

    key = repr((n, cfg.batch_size, cfg.local_steps, cfg.rounds, budget, delta, cfg.accountant))
    if PLAN in context.state and context.state[PLAN].get("key") == key:
        saved = context.state[PLAN]
        return DPPlan(float(saved["noise-multiplier"]), float(saved["sample-rate"]),
                      cfg.local_steps, cfg.rounds, budget, delta, cfg.accountant)
    plan = plan_site(n, batch_size=cfg.batch_size, steps_per_round=cfg.local_steps,
                     rounds=cfg.rounds, epsilon=budget, delta=delta, accountant=cfg.accountant)
    context.state[PLAN] = ConfigRecord({"key": key, "noise-multiplier": plan.noise_multiplier,
                                        "sample-rate": plan.sample_rate})
    return plan


def _plan(context: Context, cfg: FedConfig, site: SiteSettings, n: int,
          ledger: PrivacyLedger | None, job: str, done: int) -> tuple["DPPlan", float]:
    """This job's DP plan and the epsilon other jobs already spent on this site's data."""
    from common.privacy import PrivacyError, epsilon_spent

    other = _other(ledger, job) if ledger else 0.0
    budget = site.epsilon - other
    if budget <= 0:
        raise Refusal(f"earlier runs spent epsilon {other:.3f} of the site's budget "
                      f"{site.epsilon}; nothing is left for this run")
    try:
        plan = _calibrated(context, cfg, n, budget, site.delta)
    except PrivacyError as exc:  # e.g. delta not below 1/n, or the batch covers all data
        raise Refusal(str(exc)) from None
    recorded = ledger.plan_of(job) if ledger else None
    if recorded and not np.allclose(recorded, (plan.noise_multiplier, plan.sample_rate),
                                    rtol=1e-9, atol=0):
        raise Refusal(f"this run started with noise multiplier {recorded[0]:.4f} and sample "
                      f"rate {recorded[1]:.5f}, now {plan.noise_multiplier:.4f} and "
                      f"{plan.sample_rate:.5f} (rounds, local steps, batch size or the data "
                      "changed): the calibration cannot change mid-run; start a new run")
    after = epsilon_spent(plan.noise_multiplier, plan.sample_rate, done + cfg.local_steps,
                          site.delta, plan.accountant)
    if other + after > site.epsilon * (1 + 1e-9):
        raise Refusal(f"this round would bring epsilon to {other + after:.3f}, over the site's "
                      f"budget of {site.epsilon}")
    return plan, other


def _train(msg: Message, context: Context) -> Message:
    from client.trainer import train_local
    from common.batches import encode
    from common.model import pick_device, trainable_state
    from common.privacy import epsilon_spent

    started = time.monotonic()
    cfg, site, examples = _load(msg, context)
    if cfg.secagg:  # before any training: a round below the site's policy costs no budget
        secagg.check_round(msg, context, cfg, site)
    job = str(msg.content["config"].get(JOB_KEY, context.run_id))
    server_round = int(msg.content["config"].get(ROUND_KEY, 0))
    ledger = (PrivacyLedger.open(site.ledger_path, site.name, site.epsilon, site.delta)
              if cfg.dp and site.ledger_path else None)
    model, tokenizer, global_state = _global_model(msg, cfg)
    digest = state_digest(global_state)
    weight = site_weight(len(examples), cfg)
    saved = load_update(resend_path(ledger.path), job, server_round, digest) if ledger else None
    plan: DPPlan | None = None
    other = 0.0
    if saved is not None:
        # The server asks again for a round this site already trained: answer with
        # the same update (no new spend) and make sure the ledger holds it.
        log.info("site %s: round %d of job %s was trained before; resending that update",
                 site.name, server_round, job)
        ledger.record(job, server_round, saved.steps, saved.epsilon,
                      noise_multiplier=saved.noise_multiplier, sample_rate=saved.sample_rate)
        update, steps, loss = saved.update, saved.steps, float("nan")
        epsilon = _other(ledger, job) + saved.epsilon
        noise_multiplier = saved.noise_multiplier
    else:
        done = ledger.steps_done(job) if ledger else _steps_done(context)
        if cfg.dp:
            plan, other = _plan(context, cfg, site, len(examples), ledger, job, done)
        device = pick_device(site.device)
        result = train_local(model, encode(tokenizer, examples, cfg.max_length), cfg, plan, device)
        steps = done + result.steps
        loss = result.mean_loss
        context.state[PROGRESS] = MetricRecord({"steps": steps})
        job_epsilon = (epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, site.delta,
                                     plan.accountant) if plan else float("inf"))
        epsilon = other + job_epsilon
        noise_multiplier = plan.noise_multiplier if plan else 0.0
        local_state = to_numpy_state(trainable_state(model))
        update = {k: weight * (local_state[k] - global_state[k]) for k in global_state}
        if ledger is not None:
            # Spend is recorded before anything trained leaves this function.
            save_update(resend_path(ledger.path), SavedUpdate(job, server_round, digest, update,
                                                              weight, steps, job_epsilon,
                                                              plan.noise_multiplier,
                                                              plan.sample_rate))
            ledger.record(job, server_round, steps, job_epsilon,
                          noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    if not all(np.isfinite(v).all() for v in update.values()):
        raise Refusal("local training diverged (NaN/inf in the update); lower --lr or "
                      "--max-grad-norm")
    log.info("site %s: round %d, %d steps in this run, loss %.4f, epsilon %.3f / %s, %.1fs",
             site.name, server_round, steps, loss, epsilon,
             site.epsilon if cfg.dp else "inf (no DP)", time.monotonic() - started)
    status = ConfigRecord({"site": site.name, "private": cfg.dp})
    metrics = {"epsilon": epsilon if cfg.dp else -1.0, "steps": steps,
               "noise-multiplier": noise_multiplier}
    if cfg.secagg:
        # Only public keys leave now; the update leaves masked, in stage 2. The
        # weight and the training loss stay private to the site.
        keys = secagg.begin_round(msg, context, cfg, site, flatten(update), weight)
        return Message(RecordDict({"secagg": keys, "metrics": MetricRecord(metrics),
                                   "status": status}), reply_to=msg)
    metrics.update({"weight": weight, "train-loss": loss})
    return Message(RecordDict({"update": state_to_record(update), "metrics": MetricRecord(metrics),
                               "status": status}), reply_to=msg)


def _other(ledger: PrivacyLedger, job: str) -> float:
    """Epsilon other jobs spent on this site's data (sequential composition)."""
    return ledger.epsilon_spent() - ledger.epsilon_spent(job)


app.train(secagg_wire.SHARE_KEYS)(secagg.share_keys)
app.train(secagg_wire.MASKED_INPUT)(secagg.masked_input)
app.train(secagg_wire.CONSISTENCY)(secagg.consistency)
app.train(secagg_wire.UNMASK)(secagg.unmask)


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on the site's own data (not differentially private)."""
    from common.batches import encode, evaluate
    from common.model import pick_device

    cfg, site, examples = _load(msg, context)
    device = pick_device(site.device)
    model, tokenizer, _ = _global_model(msg, cfg)
    model.to(device)
    scores = evaluate(model, encode(tokenizer, examples, cfg.max_length),
                      batch_size=cfg.eval_batch_size, num_labels=len(cfg.labels), device=device)
    # A coarse weight, never the exact count (see common.weights).
    return Message(RecordDict({"metrics": MetricRecord({**scores,
                                                        "weight": site_weight(len(examples), cfg)}),
                               "status": ConfigRecord({"site": site.name})}), reply_to=msg)
