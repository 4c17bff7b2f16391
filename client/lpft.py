"""An LP-FT round at a site (``finetune = lora``): the probe's rounds, then adapter rounds.

The run's first rounds are the probe's (:func:`fedseal.client.probe.probe_round`:
the statistics round, then DP head rounds) on the features of the model whose
adapters are still the identity; its last rounds
(:meth:`fedseal.common.dp_rule.Recipe.is_adapter_round`) are
:func:`fedseal.client.lora_round.lora_round` on the adapters and the head's
weights, from the federation's head, on the site's cached states below the
adapters (:mod:`fedseal.common.hidden_cache`, computed once per site). Each
adapter round steps at the plan's adapter phase
(:func:`fedseal.common.lora_rule.round_phase`), which the site's accountant
composes with the probe's phases (:mod:`fedseal.client.history`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedseal.client.lora_round import lora_round
from fedseal.client.probe import probe_round
from fedseal.client.trainer import LocalResult
from fedseal.common.dp_rule import Recipe
from fedseal.common.hidden_cache import HiddenStates, hidden_states
from fedseal.common.lora_rule import lora_recipe, round_phase
from fedseal.common.privacy import DPPlan
from fedseal.common.top_layers import adapted_layers, encoder_layers


def states_below_adapters(
    model: nn.Module, data: TensorDataset, device: torch.device, cache_dir: Path | None = None
) -> HiddenStates:
    """The site's cached token states entering the lowest adapted layer (computed once per
    site, :func:`fedseal.common.hidden_cache.hidden_states`)."""
    cut = len(encoder_layers(model.backbone)) - adapted_layers(model)
    return hidden_states(model, data, cut, device, cache_dir)


def lpft_round(
    model: nn.Module,
    data: TensorDataset,
    rec: Recipe,
    plan: DPPlan | None,
    server_round: int,
    bucket: int,
    device: torch.device,
    cache_dir: Path | None = None,
) -> LocalResult:
    """Round ``server_round`` of LP-FT at a site of size bucket ``bucket``, on ``model`` in place.

    Without a plan (a non-private run) the same sampling and steps, without noise.
    """
    if not rec.is_adapter_round(server_round):
        return probe_round(model, data, rec, plan, server_round, device, cache_dir)
    lrec = lora_recipe(bucket, rec.adapter_rounds)
    hidden = states_below_adapters(model, data, device, cache_dir)
    phase = round_phase(plan, rec, server_round, lrec.steps_per_round) if plan else None
    return lora_round(model, hidden, data.tensors[2], lrec, phase, device)


__all__ = ["lpft_round", "states_below_adapters"]
