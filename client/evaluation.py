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

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedseal.client.trainer import fresh_generator
from fedseal.common.batches import predict
from fedseal.common.egress import EVAL_LOSS_CLIP
from fedseal.common.privacy import DPPlan

LOSS_CLIP = EVAL_LOSS_CLIP
"""A single example's cross-entropy counts as at most this (a confident mistake)."""
ROW_PARTS = 3


@torch.no_grad()
def example_scores(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device,
                   features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness (0/1) and cross-entropy of ``model`` on ``data``.

    With ``features`` (the probe's cached pooled features of ``data``), only the head runs.
    """
    if features is not None:
        logits = model.head(features.to(device))
    else:
        logits = predict(model, data, batch_size=batch_size, device=device)
    labels = data.tensors[2].to(logits.device)
    correct = (logits.argmax(dim=-1) == labels).float().cpu()
    loss = nn.functional.cross_entropy(logits.float(), labels, reduction="none").cpu()
    return correct, loss


def release_scores(correct: torch.Tensor, loss: torch.Tensor,
                   plan: DPPlan | None) -> dict[str, float]:
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
    return {"accuracy": min(max(float(total[0]) / count, 0.0), 1.0),
            "loss": LOSS_CLIP * min(max(float(total[1]) / count, 0.0), 1.0)}


__all__ = ["LOSS_CLIP", "example_scores", "release_scores"]
