"""A distributed-noise round's public parameters, shared by the server and the sites.

Under ``dp-noise = distributed`` (docs/ddp.md) every round of the probe is one
step of the sampled Gaussian mechanism over all sites' records, summed inside
SecAgg+:

* round 1, the **statistics** step: each row ``[x / max(|x|, 1), onehot(y), 1] /
  sqrt(3)`` (norm at most 1, so clip 1) of a site's Poisson sample is summed;
  the federation's sum gives the feature mean, the label proportions and the
  expected size of a step's sample (:data:`STATISTICS_CLIP`);
* rounds 2 and on, the **head** steps: each sampled record's gradient of the
  cross-entropy on the head's weights, clipped to ``clip`` in L2 and summed;
  the server steps the head with the noisy sum (:mod:`fedseal.server.ddp_round`);
* under ``finetune = lora`` (LP-FT), the last rounds are **adapter** steps
  (:func:`fedseal.common.vote.is_adapter_round`): each sampled record's gradient
  on the top layers' LoRA adapters and the head's weights, flattened in the
  order of :func:`step_keys`, clipped to the adapter rounds' clip under the sum's
  noise (:data:`fedseal.common.lora_rule.DISTRIBUTED_CLIP`) and summed.

The server plans one :class:`~fedseal.common.ddp.Encoding` per round from public
values only (:func:`plan_round`) and sends it with a fresh 32-byte rotation seed
in the ``ddp`` record of the round's ``train`` message; a site rebuilds it with
:func:`encoding_from_record` (every field checked by
:class:`~fedseal.common.ddp.Encoding`) and refuses one that does not fit the round
(:func:`round_shape`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import ConfigRecord

from fedseal.common.config import AUTO, FedConfig
from fedseal.common.ddp import DdpError, Encoding, calibrate_noise_multiplier, plan_encoding
from fedseal.common.dp_rule import (
    FEATURE_MEAN_KEY,
    PRIOR_KEY,
    PROBE_CLIP,
    PROBE_LR,
    SAMPLE_RATE,
    stats_rounds,
)
from fedseal.common.lora_rule import DISTRIBUTED_CLIP as ADAPTER_CLIP
from fedseal.common.privacy import MAX_SAMPLE_RATE
from fedseal.common.vote import is_adapter_round, round_keys

RECORD = "ddp"
"""The ConfigRecord of a distributed-noise round's encoding (server -> sites)."""
SEED = "rotation-seed"
STATISTICS_PARTS = 3
"""A statistics row's parts (feature vector, label one-hot, count), each of norm at most 1."""
STATISTICS_CLIP = 1.0
"""A statistics row has norm at most 1 (each part at most 1, over ``sqrt(3)``)."""
SAMPLE_TAIL = 6.0
"""Standard deviations above a site's expected Poisson sample that :func:`sum_bound` allows."""
_FIELDS = {
    "dim": int,
    "clip": float,
    "sum-bound": float,
    "scale": float,
    "share-sigma": int,
    "max-sites": int,
    "wrap-probability": float,
}


def is_statistics_round(cfg: FedConfig, server_round: int) -> bool:
    """Whether ``server_round`` is the statistics step."""
    return server_round <= stats_rounds(cfg)


def head_clip(cfg: FedConfig) -> float:
    """The per-record L2 clip of a head step's gradient (``max-grad-norm``, auto: the probe's)."""
    return PROBE_CLIP if cfg.max_grad_norm == AUTO else float(cfg.max_grad_norm)


def head_lr(cfg: FedConfig) -> float:
    """The server's learning rate on the mean clipped gradient (``lr``, auto: the probe's)."""
    return PROBE_LR if cfg.lr == AUTO else float(cfg.lr)


def step_keys(weights: Mapping[str, np.ndarray], cfg: FedConfig, server_round: int) -> list[str]:
    """The weights a head or adapter step moves, in the order their gradients are flattened
    into one vector (sorted by name: the same at the server and every site, whatever order
    a message lists them in)."""
    return sorted(round_keys(weights, cfg, server_round))


def round_shape(cfg: FedConfig, weights: Mapping[str, np.ndarray], server_round: int) -> tuple[int, float]:
    """``(dim, clip)`` of a site's vector in ``server_round``: what its encoding must have.

    ``weights`` are the round's global weights (names to arrays; only their sizes
    are read): the statistics row's length follows the feature mean and the
    prior, a step's the weights it moves (:func:`step_keys`).
    """
    if is_statistics_round(cfg, server_round):
        return weights[FEATURE_MEAN_KEY].size + weights[PRIOR_KEY].size + 1, STATISTICS_CLIP
    dim = sum(weights[k].size for k in step_keys(weights, cfg, server_round))
    return dim, ADAPTER_CLIP if is_adapter_round(cfg, server_round) else head_clip(cfg)


def planned_sample_rate(cfg: FedConfig) -> float:
    """The Poisson rate the server sizes the noise for: the probe's, or the most a site samples
    when the run sets the batch size (a site's own rate then depends on its size bucket)."""
    return SAMPLE_RATE if cfg.batch_size == AUTO else MAX_SAMPLE_RATE


def honest_shares(cfg: FedConfig) -> int:
    """Honest shares the server sizes each share for: ``min-clients - max-colluders``."""
    return cfg.min_clients - cfg.max_colluders


@lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The sum's noise multiplier for ``steps`` steps at ``(epsilon, delta)`` (cached: seconds)."""
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps)


def sum_bound(cfg: FedConfig, clip: float) -> float:
    """A site's clipped sum is projected onto this ball: ``clip`` times the most records a site
    of ``max-site-examples`` records draws at the planned rate, its expected sample plus
    :data:`SAMPLE_TAIL` standard deviations (public; never a site's count).

    A Poisson sample beyond it (probability below 1e-9) is projected onto the ball, which
    keeps the step private (the projection is 1-Lipschitz) and merely shortens it. The
    bound is also the most one hostile site can move the sum by within the decoded sum's
    check (docs/threat-model.md): set ``max-site-examples`` near the largest real site.
    """
    expected = planned_sample_rate(cfg) * cfg.max_site_examples
    return clip * (expected + SAMPLE_TAIL * math.sqrt(expected))


def plan_round(cfg: FedConfig, weights: Mapping[str, np.ndarray], server_round: int, cohort: int) -> Encoding:
    """The server's encoding of ``server_round`` for a cohort of ``cohort`` sites
    (``weights``: the round's global weights, for :func:`round_shape`).

    Raises
    ------
    fedseal.common.ddp.DdpError
        If no encoding fits (the message says what to lower).
    """
    dim, clip = round_shape(cfg, weights, server_round)
    z = noise_multiplier(cfg.epsilon, cfg.delta, planned_sample_rate(cfg), cfg.rounds)
    return plan_encoding(
        dim=dim,
        clip=clip,
        sum_bound=sum_bound(cfg, clip),
        max_sites=cohort,
        noise_multiplier=z,
        honest_shares=honest_shares(cfg),
    )


def fresh_seed() -> bytes:
    """A round's public rotation seed."""
    return os.urandom(32)


def encoding_to_record(encoding: Encoding, seed: bytes) -> ConfigRecord:
    """The ``ddp`` record of a round."""
    return ConfigRecord(
        {
            "dim": encoding.dim,
            "clip": float(encoding.clip),
            "sum-bound": float(encoding.sum_bound),
            "scale": float(encoding.scale),
            "share-sigma": int(encoding.share_sigma),
            "max-sites": encoding.max_sites,
            "wrap-probability": float(encoding.wrap_probability),
            SEED: seed,
        }
    )


def encoding_from_record(record: Mapping[str, object]) -> tuple[Encoding, bytes]:
    """The round's encoding and rotation seed, every field checked.

    Raises
    ------
    fedseal.common.ddp.DdpError
        If a field is missing, of the wrong type, or out of range.
    """
    values = {}
    for key, kind in _FIELDS.items():
        value = record.get(key) if hasattr(record, "get") else None
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise DdpError(f"the encoding's {key!r} is missing or not a {kind.__name__}")
        values[key.replace("-", "_")] = kind(value)
    seed = record.get(SEED)
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise DdpError("the encoding's rotation seed is missing or not 32 bytes")
    if not all(math.isfinite(v) for v in values.values()):
        raise DdpError("the encoding holds a number that is not finite")
    return Encoding(**values), seed


__all__ = [
    "RECORD",
    "SEED",
    "STATISTICS_CLIP",
    "SAMPLE_TAIL",
    "STATISTICS_PARTS",
    "encoding_from_record",
    "encoding_to_record",
    "fresh_seed",
    "head_clip",
    "head_lr",
    "honest_shares",
    "is_statistics_round",
    "noise_multiplier",
    "plan_round",
    "planned_sample_rate",
    "round_shape",
    "step_keys",
    "sum_bound",
]
