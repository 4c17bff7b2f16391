"""The probe's two phases at a site, on its cached features (see :mod:`fedseal.common.dp_rule`).

* :func:`release_statistics` (the statistics round): a Poisson sample of the
  site's feature vectors, each of norm at most 1 and extended by its label's
  one-hot vector and a constant 1 (so the sum also counts the sample and its
  labels), scaled to norm at most 1, summed, plus Gaussian noise of the plan's
  multiplier: one step of the sampled Gaussian mechanism, accounted like a
  DP-SGD step. It gives the site's mean feature vector, its label proportions
  and its example count, all from the one noisy sum; the count becomes the
  site's weight in the round (:func:`fedseal.common.weights.stats_weight`). The
  site sends the mean in ``feature_mean`` and the proportions in the head's
  bias, which the server turns into the log of the federation's label prior
  (:func:`fedseal.common.dp_rule.prior_bias`).
* :func:`train_head` (every later round): Opacus DP-SGD with heavy-ball momentum
  on the linear head's weights over the standardised features (the bias stays
  the federation's log prior); the head returned is the average of the iterates
  over the second half of the round's steps.

Without a plan both run without noise (not private), with the same sampling
and steps, so the non-private arm does the same work.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedseal.client.randomness import fresh_generator
from fedseal.client.trainer import LocalResult
from fedseal.common.ddp_wire import STATISTICS_PARTS
from fedseal.common.dp_rule import Recipe
from fedseal.common.features import features
from fedseal.common.privacy import DPPlan


class Statistics(NamedTuple):
    """A site's statistics release: mean feature vector, label proportions, example count."""

    mean: np.ndarray
    proportions: np.ndarray
    examples: float


def statistics_rows(features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Each record's statistics row ``[x / max(|x|, 1), onehot(y), 1] / sqrt(3)``: norm at most 1."""
    rows = features / features.norm(dim=1, keepdim=True).clamp(min=1.0)
    onehot = nn.functional.one_hot(labels, num_labels).to(rows.dtype)
    return torch.cat([rows, onehot, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1) / math.sqrt(
        STATISTICS_PARTS
    )


def release_statistics(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, plan: DPPlan | None
) -> Statistics:
    """The statistics round's estimates of the site's mean feature vector, label mix and size.

    One step: every row ``[x / max(|x|, 1), onehot(y), 1] / sqrt(3)`` has norm at
    most 1 (sensitivity 1), the Poisson sample's rows are summed with Gaussian
    noise, the mean is the noisy feature sum over the noisy count (at least 1),
    the proportions the noisy label counts (negative ones as 0) over their sum
    (uniform when none is positive), the count the noisy count over the
    sampling rate. Without a plan, all exactly.
    """
    table = statistics_rows(features, labels, num_labels)
    dim = features.shape[1]
    if plan is None:
        return Statistics(
            table[:, :dim].mean(dim=0).numpy() * math.sqrt(STATISTICS_PARTS),
            table[:, dim : dim + num_labels].mean(dim=0).numpy() * math.sqrt(STATISTICS_PARTS),
            float(len(table)),
        )
    gen = fresh_generator(torch.device("cpu"))
    keep = torch.rand(len(table), generator=gen) < plan.sample_rate
    total = table[keep].sum(dim=0) + plan.noise_multiplier * torch.randn(table.shape[1], generator=gen)
    total *= math.sqrt(STATISTICS_PARTS)
    sampled = max(float(total[-1]), 1.0)
    counts = total[dim : dim + num_labels].clamp(min=0.0)
    proportions = counts / counts.sum() if counts.sum() > 0 else torch.full((num_labels,), 1.0 / num_labels)
    return Statistics((total[:dim] / sampled).numpy(), proportions.numpy(), sampled / plan.sample_rate)


def train_head(
    model, feats: torch.Tensor, labels: torch.Tensor, recipe: Recipe, plan: DPPlan | None
) -> LocalResult:
    """``recipe.steps_per_round`` steps on the head's weights in place; mean loss and steps."""
    with torch.no_grad():
        x = model.standardise(feats)
    head = nn.Linear(x.shape[1], model.classifier.out_features)
    head.load_state_dict(model.classifier.state_dict())
    head.bias.requires_grad_(False)  # the federation's log prior (see the module docstring)
    if plan is None:
        loader = DataLoader(
            TensorDataset(x, labels),
            batch_size=recipe.batch_size,
            shuffle=True,
            generator=fresh_generator(torch.device("cpu")),
        )
        optimizer = torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=recipe.momentum)
        module, reduction = head, "mean"
    else:
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        # Poisson sampling at the plan's rate (set from the site's size bucket,
        # never its exact count). Summed loss: Opacus adds noise to the sum of
        # clipped per-example gradients; dividing the learning rate by the
        # expected batch of the bucket makes the step the mean's. An empty
        # Poisson batch is still a (noise-only) step.
        loader = DPDataLoader(
            TensorDataset(x, labels),
            sample_rate=plan.sample_rate,
            generator=fresh_generator(torch.device("cpu")),
        )
        optimizer = torch.optim.SGD(
            head.parameters(), lr=recipe.lr / recipe.batch_size, momentum=recipe.momentum
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            module, optimizer, loader = PrivacyEngine(accountant=plan.accountant).make_private(
                module=head,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=recipe.clip,
                poisson_sampling=False,
                loss_reduction="sum",
                noise_generator=fresh_generator(torch.device("cpu")),
            )
        reduction = "sum"
    steps, losses, seen = 0, [], 0
    average = {k: torch.zeros_like(v) for k, v in head.state_dict().items()}
    start_average = recipe.steps_per_round // 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while steps < recipe.steps_per_round:
            for xb, yb in loader:
                if steps >= recipe.steps_per_round:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(module(xb), yb, reduction=reduction)
                loss.backward()
                optimizer.step()
                steps += 1
                if len(yb):
                    losses.append(loss.item() / (len(yb) if reduction == "sum" else 1))
                if steps > start_average:
                    for k, v in head.state_dict().items():
                        average[k] += v.detach()
                    seen += 1
    if plan is not None and hasattr(module, "remove_hooks"):
        cast(Any, module).remove_hooks()  # the GradSampleModule Opacus made
    with torch.no_grad():
        model.classifier.weight.copy_(average["weight"] / seen)
        model.classifier.bias.copy_(average["bias"] / seen)
    return LocalResult(mean_loss=float(np.mean(losses)) if losses else float("nan"), steps=steps)


def probe_round(
    model,
    data: TensorDataset,
    recipe: Recipe,
    plan: DPPlan | None,
    server_round: int,
    device: torch.device,
    cache_dir=None,
) -> LocalResult:
    """One round of the probe at a site: the statistics release or head training, in place."""
    feats = features(model, data, device, cache_dir)
    if recipe.is_stats_round(server_round):
        stats = release_statistics(feats, data.tensors[2], model.classifier.out_features, plan)
        with torch.no_grad():
            model.feature_mean.copy_(torch.from_numpy(stats.mean))
            model.classifier.bias.copy_(torch.from_numpy(stats.proportions))
        return LocalResult(mean_loss=float("nan"), steps=1, count=stats.examples)
    return train_head(model, feats, data.tensors[2], recipe, plan)


__all__ = [
    "STATISTICS_PARTS",
    "Statistics",
    "probe_round",
    "release_statistics",
    "statistics_rows",
    "train_head",
]
