"""Local training of the encoder at one site (LoRA or full): Opacus DP-SGD, or plain AdamW."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedseal.client.dp_step import noise_only_step
from fedseal.client.randomness import fresh_generator
from fedseal.common.batches import model_inputs
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import Recipe
from fedseal.common.privacy import DPPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training produced."""

    mean_loss: float
    steps: int
    count: float | None = None  # the statistics round's (DP) estimate of the site's examples


def _optimizer(model: nn.Module, cfg: FedConfig, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=cfg.weight_decay)


def train_local(
    model: nn.Module,
    data: TensorDataset,
    cfg: FedConfig,
    recipe: Recipe,
    plan: DPPlan | None,
    device: torch.device,
) -> LocalResult:
    """Run ``recipe.steps_per_round`` optimiser steps on ``data`` in place (LoRA or full).

    With a ``plan``, Opacus makes the model private: Poisson sampling at
    ``plan.sample_rate``, per-sample clipping to ``recipe.clip`` and
    Gaussian noise of ``plan.noise_multiplier``. The caller accounts the steps
    (see :mod:`fedseal.common.privacy`) so spend is known before anything leaves the site.
    Without a plan it is plain minibatch AdamW, which is not private.
    """
    model.to(device)
    model.train()
    optimizer = _optimizer(model, cfg, recipe)
    engine = None
    if plan is None:
        loader = DataLoader(
            data, batch_size=recipe.batch_size, shuffle=True, generator=fresh_generator(torch.device("cpu"))
        )
    else:
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        # Poisson sampling at the plan's rate, set from the site's size bucket.
        loader = DPDataLoader(
            data, sample_rate=plan.sample_rate, generator=fresh_generator(torch.device("cpu"))
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=plan.accountant)
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=recipe.clip,
                poisson_sampling=False,
                noise_generator=fresh_generator(device),
            )
        # The mean's denominator: the bucket's expected batch, never the exact count.
        optimizer.expected_batch_size = recipe.batch_size
    losses: list[float] = []
    steps = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while steps < recipe.steps_per_round:
                for input_ids, attention_mask, labels in loader:
                    if steps >= recipe.steps_per_round:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    if input_ids.shape[0] == 0:
                        # An empty Poisson batch is still a step: noise alone is added.
                        noise_only_step(optimizer)
                        steps += 1
                        continue
                    out = model(
                        **model_inputs(model, input_ids, attention_mask, device), labels=labels.to(device)
                    )
                    out.loss.backward()
                    optimizer.step()
                    losses.append(float(out.loss.detach()))
                    steps += 1
    finally:
        if engine is not None and hasattr(model, "remove_hooks"):
            cast(Any, model).remove_hooks()  # the GradSampleModule Opacus made
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return LocalResult(mean_loss=mean_loss, steps=steps)
