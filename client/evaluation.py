"""Federated evaluation at a site: accuracy and loss of the server's model, as a DP release.

A site that allows federated evaluation (policy ``federated-eval = on``) scores
the server's weights on its own data. Exact scores are a function of the
site's records (and an exact fraction names its example count), so the answer
is one step of the same sampled Gaussian mechanism the site trains with, at
the job's noise multiplier and sampling rate, counted in its budget like a
training step:

* each example contributes the row ``[correct, min(loss, L) / L, 1] / sqrt(3)``
  (``L`` = :data:`LOSS_CLIP`), of norm at most 1;
* a Poisson sample of the rows is summed and Gaussian noise of the plan's
  multiplier added to each of the three sums;
* the accuracy is the noisy correct count over the noisy count, the loss ``L``
  times the noisy clipped-loss sum over the noisy count, each clipped to its
  range (post-processing).

Without DP (a non-private run) the scores are exact.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from flwr.app import Context, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fedseal.client import cache, once
from fedseal.client.history import epsilon_after
from fedseal.client.plan import job_plan
from fedseal.client.policy import check_evaluate, check_hold
from fedseal.client.randomness import fresh_generator
from fedseal.client.reply import message_config, message_round
from fedseal.client.site import feature_cache, reply_hold, site_settings
from fedseal.client.spend import CommittedRound, commit_round, steps_done
from fedseal.client.training import TRAINED, examples_of, global_model, open_ledger
from fedseal.common.batches import predict
from fedseal.common.buckets import size_bucket
from fedseal.common.dp_rule import recipe
from fedseal.common.egress import EVAL_LOSS_CLIP
from fedseal.common.phases import Phase
from fedseal.common.privacy import DPPlan
from fedseal.common.refusals import Code, Refusal

EVALUATED = "fedseal.evaluated-rounds"  # the once-per-round record of evaluated (job, round) pairs
EVALUATED_SUFFIX = ".evaluated.json"  # its file, beside the ledger

LOSS_CLIP = EVAL_LOSS_CLIP
"""A single example's cross-entropy counts as at most this (a confident mistake)."""
ROW_PARTS = 3


@torch.no_grad()
def example_scores(
    model: nn.Module,
    data: TensorDataset,
    batch_size: int,
    device: torch.device,
    features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness (0/1) and cross-entropy of ``model`` on ``data``.

    With ``features`` (the probe's cached pooled features of ``data``), only the head runs.
    """
    if features is not None:
        logits = cast(Any, model).head(features.to(device))  # the probe's model
    else:
        logits = predict(model, data, batch_size=batch_size, device=device)
    labels = data.tensors[2].to(logits.device)
    correct = (logits.argmax(dim=-1) == labels).float().cpu()
    loss = nn.functional.cross_entropy(logits.float(), labels, reduction="none").cpu()
    return correct, loss


def release_scores(correct: torch.Tensor, loss: torch.Tensor, plan: DPPlan | None) -> dict[str, float]:
    """Accuracy and mean clipped loss: one step of the sampled Gaussian mechanism (exact without a plan)."""
    clipped = loss.clamp(min=0.0, max=LOSS_CLIP) / LOSS_CLIP
    rows = torch.stack([correct, clipped, torch.ones_like(correct)], dim=1)
    if plan is None:
        total = rows.sum(dim=0)
    else:
        gen = fresh_generator(torch.device("cpu"))
        keep = torch.rand(len(rows), generator=gen) < plan.sample_rate
        noise = plan.noise_multiplier * torch.randn(ROW_PARTS, generator=gen)
        total = (rows[keep] / math.sqrt(ROW_PARTS)).sum(dim=0) + noise
        total = total * math.sqrt(ROW_PARTS)
    count = max(float(total[2]), 1.0)
    return {
        "accuracy": min(max(float(total[0]) / count, 0.0), 1.0),
        "loss": LOSS_CLIP * min(max(float(total[1]) / count, 0.0), 1.0),
    }


def evaluate_round(content: RecordDict, context: Context) -> tuple[CommittedRound, dict[str, float]]:
    """Score the server's weights on the site's data, as a DP release committed to the budget.

    Refused unless the site allows federated evaluation and the run planned it;
    then at most once per round of a job this site trained in (remembered
    beside the ledger, :mod:`fedseal.client.once`).
    """
    from fedseal.common.features import features
    from fedseal.common.model import pick_device

    cfg = message_config(content)
    site = site_settings(context.node_config, cfg)
    check_hold(reply_hold(context.node_config), cfg)
    check_evaluate(site.policy, cfg)
    job, server_round = message_round(content, context)
    if (job, server_round) not in once.done(context, TRAINED, None):
        raise Refusal(
            Code.ROUND_NOT_TRAINED,
            f"this site did not train round {server_round} of "
            f"job {job}; it scores only rounds it took part in",
            round=server_round,
        )
    path = once.record_path(site.ledger_path, EVALUATED_SUFFIX) if site.ledger_path else None
    evaluated = once.done(context, EVALUATED, path)
    if (job, server_round) in evaluated:
        raise Refusal(
            Code.ROUND_EVALUATED,
            f"round {server_round} of job {job} was already evaluated here; a site answers once per round",
            round=server_round,
        )
    examples = examples_of(cfg, site)
    bucket = size_bucket(len(examples))
    ledger = open_ledger(site) if cfg.dp else None
    steps = steps_done(ledger, context, job) + 1
    plan = (
        job_plan(context, cfg, recipe(cfg, bucket), site, bucket, ledger, job, server_round, evaluation=True)
        if cfg.dp
        else None
    )
    once.remember(context, EVALUATED, path, evaluated | {(job, server_round)})
    model, tokenizer, _ = global_model(content, cfg)
    device = pick_device(site.device)
    model.to(device)
    data = cache.encoded(tokenizer, examples, cfg.max_length)
    feats = features(model, data, device, feature_cache(site)) if cfg.finetune == "probe" else None
    scores = release_scores(*example_scores(model, data, cfg.eval_batch_size, device, feats), plan)
    job_epsilon = (
        epsilon_after(ledger, context, job, plan, Phase(plan.noise_multiplier, plan.sample_rate, 1))
        if plan
        else None
    )
    noise, rate = (plan.noise_multiplier, plan.sample_rate) if plan else (0.0, 0.0)
    committed = commit_round(
        site.name,
        ledger,
        context,
        job,
        server_round,
        steps,
        job_epsilon,
        plan.delta if plan else site.delta,
        {},
        0.0,
        noise_multiplier=noise,
        sample_rate=rate,
        evaluation=True,
    )
    return committed, scores


__all__ = ["EVALUATED", "EVALUATED_SUFFIX", "LOSS_CLIP", "evaluate_round", "example_scores", "release_scores"]
