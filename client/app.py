"""The ClientApp that runs at each data site.

One round, seen from a site:

1. ``train``: load the server's global trainable weights into the local model,
   run DP-SGD on the site's own file, record the epsilon this round spends
   *before* anything leaves the site, and reply with the weighted update
   ``w * (local - global)`` and ``w`` (plain path), or, with secure
   aggregation, keep the encoded update and reply with fresh public keys;
3. ``train.secagg_*``: the later SecAgg+ stages (:mod:`client.secagg`): share
   keys, send the masked update, help unmask.
4. ``evaluate`` (optional): accuracy and loss of the global weights on the site's data.

The configuration of the run arrives with every message from the server; the
site's own settings (data, budget) come from its node config (:mod:`client.site`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from torch import nn
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.site import SiteSettings, site_settings
from client.trainer import train_local
from common.batches import encode, evaluate
from common.config import FedConfig
from common.data import Examples, read_examples
from common.model import build_model, load_tokenizer, load_trainable, pick_device, trainable_state
from common.privacy import DPPlan, epsilon_spent, plan_site
from common import secagg_wire
from common.records import (flatten, record_to_config, record_to_state, state_to_record,
                            to_numpy_state)

log = logging.getLogger(__name__)

ROUND_KEY = "server-round"
PROGRESS = "fedseal.progress"  # context.state record: DP steps taken so far

app = ClientApp()


def _load(msg: Message, context: Context) -> tuple[FedConfig, SiteSettings, Examples]:
    cfg = record_to_config(msg.content["config"], extra_keys=(ROUND_KEY,))
    site = site_settings(context.node_config, cfg)
    examples = read_examples(site.data_path, text_column=cfg.text_column,
                             label_column=cfg.label_column, label_names=cfg.labels)
    return cfg, site, examples


def _global_model(msg: Message, cfg: FedConfig) -> tuple[nn.Module, object, dict[str, np.ndarray]]:
    """The local model holding the server's global weights, its tokenizer, and those weights."""
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, cfg.labels)
    template = to_numpy_state(trainable_state(model))
    global_state = record_to_state(msg.content["global"], template, what="global weights")
    load_trainable(model, global_state)
    return model, tokenizer, global_state


def _steps_done(context: Context) -> int:
    if PROGRESS in context.state:
        return int(context.state[PROGRESS]["steps"])
    return 0


def _refuse(msg: Message, site: SiteSettings, reason: str) -> Message:
    log.warning("site %s refuses to train: %s", site.name, reason)
    return Message(RecordDict({"status": ConfigRecord({"site": site.name, "refused": reason})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally with DP-SGD and reply with the weighted update."""
    started = time.monotonic()
    cfg, site, examples = _load(msg, context)
    plan: DPPlan | None = None
    done = _steps_done(context)
    if cfg.dp:
        plan = plan_site(len(examples), batch_size=cfg.batch_size,
                         steps_per_round=cfg.local_steps, rounds=cfg.rounds,
                         epsilon=site.epsilon, delta=site.delta, accountant=cfg.accountant)
        after = epsilon_spent(plan.noise_multiplier, plan.sample_rate, done + cfg.local_steps,
                              site.delta, plan.accountant)
        if after > site.epsilon * (1 + 1e-9):
            return _refuse(msg, site, f"this round would bring epsilon to {after:.3f}, "
                                      f"over the site's budget of {site.epsilon}")
    device = pick_device(site.device)
    model, tokenizer, global_state = _global_model(msg, cfg)
    result = train_local(model, encode(tokenizer, examples, cfg.max_length), cfg, plan, device)
    steps = done + result.steps
    # Spend is recorded before the update leaves this function.
    context.state[PROGRESS] = MetricRecord({"steps": steps})
    epsilon = (epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, site.delta,
                             plan.accountant) if plan else float("inf"))
    local_state = to_numpy_state(trainable_state(model))
    weight = (min(len(examples), cfg.max_site_examples) / cfg.max_site_examples
              if cfg.weighting == "examples" else 1.0)
    update = {k: weight * (local_state[k] - global_state[k]) for k in global_state}
    if not all(np.isfinite(v).all() for v in update.values()):
        return _refuse(msg, site, "local training diverged (NaN/inf in the update); "
                                  "lower --lr or --max-grad-norm")
    log.info("site %s: %d steps, loss %.4f, epsilon %.3f / %s, %.1fs", site.name,
             result.steps, result.mean_loss, epsilon, site.epsilon if plan else "inf (no DP)",
             time.monotonic() - started)
    status = ConfigRecord({"site": site.name, "private": plan is not None})
    metrics = {"epsilon": epsilon if plan else -1.0, "steps": steps,
               "noise-multiplier": plan.noise_multiplier if plan else 0.0}
    if cfg.secagg:
        # Only public keys leave now; the update leaves masked, in stage 2. The
        # weight and the training loss stay private to the site.
        keys = secagg.begin_round(msg, context, cfg, flatten(update), weight)
        return Message(RecordDict({"secagg": keys, "metrics": MetricRecord(metrics),
                                   "status": status}), reply_to=msg)
    metrics.update({"weight": weight, "train-loss": result.mean_loss})
    return Message(RecordDict({"update": state_to_record(update), "metrics": MetricRecord(metrics),
                               "status": status}), reply_to=msg)


app.train(secagg_wire.SHARE_KEYS)(secagg.share_keys)
app.train(secagg_wire.MASKED_INPUT)(secagg.masked_input)
app.train(secagg_wire.UNMASK)(secagg.unmask)


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on the site's own data (not differentially private)."""
    cfg, site, examples = _load(msg, context)
    device = pick_device(site.device)
    model, tokenizer, _ = _global_model(msg, cfg)
    model.to(device)
    scores = evaluate(model, encode(tokenizer, examples, cfg.max_length),
                      batch_size=cfg.eval_batch_size, num_labels=len(cfg.labels), device=device)
    return Message(RecordDict({"metrics": MetricRecord({**scores, "num-examples": len(examples)}),
                               "status": ConfigRecord({"site": site.name})}), reply_to=msg)
