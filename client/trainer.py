"""Local training at one site: Opacus DP-SGD (or, loudly, non-private SGD)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.batches import model_inputs
from common.config import FedConfig
from common.privacy import DPPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training produced."""

    mean_loss: float
    steps: int


def _optimizer(model: nn.Module, cfg: FedConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _fresh_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the OS's CSPRNG, never from a guessable seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


def train_local(model: nn.Module, data: TensorDataset, cfg: FedConfig,
                plan: DPPlan | None, device: torch.device) -> LocalResult:
    """Run ``cfg.local_steps`` optimiser steps on ``data`` in place.

    With a ``plan``, Opacus makes the model private: Poisson sampling at
    ``plan.sample_rate``, per-sample clipping to ``cfg.max_grad_norm`` and
    Gaussian noise of ``plan.noise_multiplier``. The caller accounts the steps
    (see :mod:`common.privacy`) so spend is known before anything leaves the site.
    Without a plan it is plain minibatch AdamW, which is not private.
    """
    model.to(device)
    model.train()
    optimizer = _optimizer(model, cfg)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True,
                        generator=_fresh_generator(torch.device("cpu")))
    engine = None
    if plan is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=plan.accountant)
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True, noise_generator=_fresh_generator(device),
            )
        expected = plan.sample_rate
        actual = loader.sample_rate if hasattr(loader, "sample_rate") else expected
        if abs(actual - expected) > 1e-12:
            raise RuntimeError(f"Opacus sampled at {actual}, the privacy plan assumed {expected}")
    losses: list[float] = []
    steps = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while steps < cfg.local_steps:
                for input_ids, attention_mask, labels in loader:
                    if steps >= cfg.local_steps:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    if input_ids.shape[0] == 0:
                        # An empty Poisson batch is still a step: noise alone is added.
                        optimizer.step()
                        steps += 1
                        continue
                    out = model(**model_inputs(model, input_ids, attention_mask, device),
                                labels=labels.to(device))
                    out.loss.backward()
                    optimizer.step()
                    losses.append(float(out.loss.detach()))
                    steps += 1
    finally:
        if engine is not None and hasattr(model, "remove_hooks"):
            model.remove_hooks()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return LocalResult(mean_loss=mean_loss, steps=steps)
